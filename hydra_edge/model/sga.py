"""Sparse global attention: a causal window plus first-in first-out global slots.

Each token attends to the last ``window`` positions (itself included) and to up
to ``n_global`` global slots. A global slot is the mean key and value of one
finished chunk; a token of chunk c sees the slots of chunks c - n_global .. c - 1.
There is no positional encoding: the SSM path carries order, so a long stream
never meets a position it was not trained on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HydraConfig


class SparseGlobalAttention(nn.Module):
    def __init__(self, cfg: HydraConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _heads(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bsz, t, _ = u.shape
        q, k, v = self.qkv(u).split(self.cfg.d_model, dim=-1)
        shape = (bsz, t, self.cfg.sga_heads, self.cfg.sga_headdim)
        return tuple(z.reshape(shape).transpose(1, 2) for z in (q, k, v))  # 3 x (B, h, T, hd)

    def _attend(self, q, keys, values, visible) -> torch.Tensor:
        scores = torch.matmul(q, keys.transpose(-1, -2)) / math.sqrt(self.cfg.sga_headdim)
        scores = scores.masked_fill(~visible, float("-inf"))
        y = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, h, T, hd)
        bsz, _, t, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(bsz, t, self.cfg.d_model))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, T, D) -> (B, T, D), attending from the start of the sequence."""
        cfg = self.cfg
        bsz, t, _ = u.shape
        q, k, v = self._heads(u)

        # global slots: the mean key and value of every chunk
        pad = (-t) % cfg.chunk
        nc = (t + pad) // cfg.chunk
        k_pool = F.pad(k, (0, 0, 0, pad)).reshape(bsz, cfg.sga_heads, nc, cfg.chunk, -1).sum(3) / cfg.chunk
        v_pool = F.pad(v, (0, 0, 0, pad)).reshape(bsz, cfg.sga_heads, nc, cfg.chunk, -1).sum(3) / cfg.chunk

        # masks: the causal window over tokens, and the last n_global finished chunks
        pos = torch.arange(t, device=u.device)
        dist = pos[:, None] - pos[None, :]
        window_visible = (dist >= 0) & (dist < cfg.window)  # (T, T)
        q_chunk = (pos // cfg.chunk)[:, None]
        slot_chunk = torch.arange(nc, device=u.device)[None, :]
        global_visible = (slot_chunk < q_chunk) & (slot_chunk >= q_chunk - cfg.n_global)  # (T, nc)

        keys = torch.cat([k, k_pool], dim=2)
        values = torch.cat([v, v_pool], dim=2)
        return self._attend(q, keys, values, torch.cat([window_visible, global_visible], dim=1))

    def step(self, u, pos, k_cache, v_cache, k_global, v_global, k_pool, v_pool):
        """Attend from T <= chunk new tokens at positions pos .. pos+T-1.

        k_cache, v_cache: (B, h, window, hd), the last entry is position pos-1.
        k_global, v_global: (B, h, n_global, hd), the last entry is the newest chunk.
        k_pool, v_pool: (B, h, hd), sums over the current chunk so far.
        Returns the output and the seven new state tensors in the same order.
        """
        cfg = self.cfg
        t = u.shape[1]
        q, k, v = self._heads(u)
        keys = torch.cat([k_cache, k], dim=2)  # (B, h, window+T, hd)
        values = torch.cat([v_cache, v], dim=2)

        # 1. visibility from absolute positions; cache entries before position 0 are empty
        q_pos = pos + torch.arange(t)
        k_pos = pos - cfg.window + torch.arange(cfg.window + t)
        dist = q_pos[:, None] - k_pos[None, :]
        window_visible = (dist >= 0) & (dist < cfg.window) & (k_pos >= 0)[None, :]
        finished_chunks = torch.div(pos, cfg.chunk, rounding_mode="floor")
        global_visible = torch.arange(cfg.n_global) >= cfg.n_global - finished_chunks  # (n_global,)
        visible = torch.cat([window_visible, global_visible[None, :].expand(t, cfg.n_global)], dim=1)
        y = self._attend(q, torch.cat([keys, k_global], dim=2), torch.cat([values, v_global], dim=2), visible)

        # 2. the window slides by T
        new_k_cache = keys[:, :, t:]
        new_v_cache = values[:, :, t:]

        # 3. at the chunk's end its mean key and value enter the global slots
        k_pool = k_pool + k.sum(2)
        v_pool = v_pool + v.sum(2)
        done = torch.remainder(pos + t, cfg.chunk) == 0
        pushed_k = torch.cat([k_global[:, :, 1:], (k_pool / cfg.chunk).unsqueeze(2)], dim=2)
        pushed_v = torch.cat([v_global[:, :, 1:], (v_pool / cfg.chunk).unsqueeze(2)], dim=2)
        new_k_global = torch.where(done, pushed_k, k_global)
        new_v_global = torch.where(done, pushed_v, v_global)
        new_k_pool = torch.where(done, torch.zeros_like(k_pool), k_pool)
        new_v_pool = torch.where(done, torch.zeros_like(v_pool), v_pool)
        return y, new_k_cache, new_v_cache, new_k_global, new_v_global, new_k_pool, new_v_pool
