"""Product-key memory (Lample et al., 2019, "Large Memory Layers with Product Keys").

The query splits in two halves, each scored against its own set of sub-keys.
The top-k of each half combine into k*k candidates whose score is the sum of
the two halves; the best k of those select rows of the value table
(pkm_subkeys**2 rows of width d_model), mixed by a softmax of their scores.
``lookup`` (keys, no table) and ``read`` (table only) are separate because the
exported bundle keeps the table outside the graphs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import HydraConfig
from .norm import RMSNorm


class ProductKeyMemory(nn.Module):
    def __init__(self, cfg: HydraConfig) -> None:
        super().__init__()
        self.cfg = cfg
        half = cfg.pkm_dim // 2
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.query = nn.Linear(cfg.d_model, cfg.pkm_dim, bias=False)
        self.subkeys = nn.Parameter(torch.randn(2, cfg.pkm_subkeys, half) * half**-0.5)
        self.values = nn.Parameter(torch.randn(cfg.pkm_size, cfg.d_model) * cfg.d_model**-0.5)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D) -> row indices (B, T, k) int64 and their weights (B, T, k)."""
        cfg = self.cfg
        k = cfg.pkm_topk
        q1, q2 = self.query(self.norm(x)).chunk(2, dim=-1)  # 2 x (B, T, pkm_dim/2)
        s1, i1 = torch.topk(torch.matmul(q1, self.subkeys[0].t()), k, dim=-1)  # (B, T, k)
        s2, i2 = torch.topk(torch.matmul(q2, self.subkeys[1].t()), k, dim=-1)

        # the k*k candidate rows and their scores
        scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (B, T, k*k)
        rows = (i1.unsqueeze(-1) * cfg.pkm_subkeys + i2.unsqueeze(-2)).flatten(-2)
        best, pick = torch.topk(scores, k, dim=-1)
        return torch.gather(rows, -1, pick), torch.softmax(best, dim=-1)

    @staticmethod
    def read(rows: torch.Tensor, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Mix the selected rows of ``values`` (M, D): -> (B, T, D)."""
        return (values[rows] * weights.unsqueeze(-1)).sum(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, weights = self.lookup(x)
        return x + self.read(rows, weights, self.values)
