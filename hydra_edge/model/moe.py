"""Chunk-routed mixture of SwiGLU experts with a load-balancing loss.

The route of chunk c is the top-k of the router logits of chunk c-1's mean
input; chunk 0 uses learned default logits. The route is therefore known
before a chunk's first token arrives, and the exported graphs can gather the
selected experts' weights by index with fixed shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HydraConfig


class ChunkMoE(nn.Module):
    def __init__(self, cfg: HydraConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, d, f = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.n_experts = e  # fewer than cfg.n_experts after pin()
        self.expert_ids = list(range(e))  # original ids of the experts kept
        self.router = nn.Linear(d, e, bias=False)
        # random, not zero: tied logits would make the first chunk's top-k depend on the backend
        self.default_logits = nn.Parameter(torch.randn(e) * 0.1)
        self.w_gate = nn.Parameter(torch.randn(e, d, f) * d**-0.5)
        self.w_up = nn.Parameter(torch.randn(e, d, f) * d**-0.5)
        self.w_down = nn.Parameter(torch.randn(e, f, d) * 0.02)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (..., E) -> expert indices (..., k) and their weights (..., k), summing to 1."""
        top, idx = torch.topk(logits, self.cfg.top_k, dim=-1)
        return idx, torch.softmax(top, dim=-1)

    def expert(self, x: torch.Tensor, w_gate, w_up, w_down) -> torch.Tensor:
        return torch.matmul(F.silu(torch.matmul(x, w_gate)) * torch.matmul(x, w_up), w_down)

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (B, T, D) -> output (B, T, D) and the load-balancing loss (scalar)."""
        cfg = self.cfg
        bsz, t, d = u.shape
        pad = (-t) % cfg.chunk
        nc = (t + pad) // cfg.chunk
        xc = F.pad(u, (0, 0, 0, pad)).reshape(bsz, nc, cfg.chunk, d)

        # 1. routes: chunk c uses the router logits of chunk c-1's mean input
        router_logits = self.router(xc.sum(2) / cfg.chunk)  # (B, nc, E)
        default = self.default_logits.expand(bsz, 1, self.n_experts)
        idx, weight = self.route(torch.cat([default, router_logits[:, :-1]], dim=1))  # (B, nc, k)

        # 2. each expert runs on the chunks routed to it
        out = torch.zeros_like(xc)
        for e in range(self.n_experts):
            hit = idx == e  # (B, nc, k)
            rows = hit.any(-1).nonzero(as_tuple=True)
            if rows[0].numel() == 0:
                continue
            w = (weight * hit).sum(-1)[rows]  # (n,)
            y = self.expert(xc[rows], self.w_gate[e], self.w_up[e], self.w_down[e])  # (n, L, D)
            out = out.index_put(rows, out[rows] + w[:, None, None] * y)

        # 3. load balance over the routes the router chose (Switch Transformer form)
        if nc > 1:
            chosen = idx[:, 1:]
            frac = F.one_hot(chosen, self.n_experts).float().mean(dim=(0, 1, 2))  # (E,)
            prob = torch.softmax(router_logits[:, :-1], dim=-1).mean(dim=(0, 1))
            aux = self.n_experts * (frac * prob).sum()
        else:
            aux = u.new_zeros(())
        return out.reshape(bsz, nc * cfg.chunk, d)[:, :t], aux

    def step(self, u, pos, route_logits, route_input_sum):
        """u: (B, T, D), T <= chunk; route_logits (B, E); route_input_sum (B, D).

        Only the top-k experts are computed: their weights are gathered by index.
        """
        cfg = self.cfg
        t = u.shape[1]
        logits = torch.where(pos == 0, self.default_logits.expand_as(route_logits), route_logits)
        idx, weight = self.route(logits)  # (B, k)

        # 1. the selected experts, gathered with fixed shapes
        w_gate = self.w_gate[idx]  # (B, k, D, F)
        w_up = self.w_up[idx]
        w_down = self.w_down[idx]  # (B, k, F, D)
        y = self.expert(u.unsqueeze(1), w_gate, w_up, w_down)  # (B, k, T, D)
        y = (y * weight[:, :, None, None]).sum(1)

        # 2. at the chunk's end its mean input sets the next route
        input_sum = route_input_sum + u.sum(1)
        done = torch.remainder(pos + t, cfg.chunk) == 0
        new_logits = torch.where(done, self.router(input_sum / cfg.chunk), logits)
        new_sum = torch.where(done, torch.zeros_like(input_sum), input_sum)
        return y, new_logits, new_sum

    @torch.no_grad()
    def pin(self, keep: list[int]) -> None:
        """Keep only the experts ``keep`` (indices into the current experts); the router ignores the rest."""
        if len(keep) < self.cfg.top_k:
            raise ValueError(f"pinning keeps {len(keep)} experts but top_k is {self.cfg.top_k}")
        index = torch.tensor(sorted(keep))
        self.router.weight = nn.Parameter(self.router.weight[index].clone())
        self.router.out_features = len(index)
        self.default_logits = nn.Parameter(self.default_logits[index].clone())
        self.w_gate = nn.Parameter(self.w_gate[index].clone())
        self.w_up = nn.Parameter(self.w_up[index].clone())
        self.w_down = nn.Parameter(self.w_down[index].clone())
        self.expert_ids = [self.expert_ids[i] for i in index.tolist()]
        self.n_experts = len(index)
