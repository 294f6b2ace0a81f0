"""Reasoning workspace: a few memory slots that tokens read and chunks write.

Every token reads the slots with one small attention. The same attention
weights address the write: at the end of a chunk, slot s moves towards the
weighted mean of the chunk's (normalised) inputs, by a learned gate scaled
with the mass the chunk sent to it. Tokens of chunk c see only what chunks
before c wrote.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import HydraConfig
from .norm import RMSNorm


class Workspace(nn.Module):
    def __init__(self, cfg: HydraConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.slots_init = nn.Parameter(torch.randn(cfg.ws_slots, cfg.d_model) * 0.02)
        self.query = nn.Linear(cfg.d_model, cfg.ws_dim, bias=False)
        self.key = nn.Linear(cfg.d_model, cfg.ws_dim, bias=False)
        self.value = nn.Linear(cfg.d_model, cfg.ws_dim, bias=False)
        self.out_proj = nn.Linear(cfg.ws_dim, cfg.d_model, bias=False)
        self.write_gate = nn.Linear(cfg.d_model, 1)

    def _read(self, xn: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xn (B, T, D), slots (B, S, D) -> read (B, T, D) and attention weights (B, T, S)."""
        scores = torch.matmul(self.query(xn), self.key(slots).transpose(1, 2)) / math.sqrt(self.cfg.ws_dim)
        attn = torch.softmax(scores, dim=-1)
        return self.out_proj(torch.matmul(attn, self.value(slots))), attn

    def _write(self, slots, write_sum, write_mass) -> torch.Tensor:
        """Move each slot towards the mean of what was written to it (B, S, D)."""
        mass = write_mass.unsqueeze(-1)  # (B, S, 1)
        candidate = write_sum / (mass + 1e-6)
        gate = torch.sigmoid(self.write_gate(candidate)) * (mass / (mass + 1.0))
        return slots + gate * (candidate - slots)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> x plus what each token read, starting from the learned slots."""
        cfg = self.cfg
        bsz, t, _ = x.shape
        xn = self.norm(x)
        slots = self.slots_init.expand(bsz, -1, -1)
        reads = []
        # one pass per chunk: the slots change only between chunks
        for start in range(0, t, cfg.chunk):
            xc = xn[:, start:start + cfg.chunk]
            read, attn = self._read(xc, slots)
            reads.append(read)
            if start + cfg.chunk <= t:
                slots = self._write(slots, torch.matmul(attn.transpose(1, 2), xc), attn.sum(1))
        return x + torch.cat(reads, dim=1)

    def step(self, x, pos, slots, write_sum, write_mass):
        """x: (B, T, D), T <= chunk; slots, write_sum: (B, S, D); write_mass: (B, S)."""
        t = x.shape[1]
        xn = self.norm(x)
        slots = torch.where(pos == 0, self.slots_init.expand_as(slots), slots)
        read, attn = self._read(xn, slots)

        write_sum = write_sum + torch.matmul(attn.transpose(1, 2), xn)
        write_mass = write_mass + attn.sum(1)
        done = torch.remainder(pos + t, self.cfg.chunk) == 0
        new_slots = torch.where(done, self._write(slots, write_sum, write_mass), slots)
        new_sum = torch.where(done, torch.zeros_like(write_sum), write_sum)
        new_mass = torch.where(done, torch.zeros_like(write_mass), write_mass)
        return x + read, new_slots, new_sum, new_mass
