"""The equal-sized baseline: a pre-norm decoder with rotary positions and a KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TransformerConfig
from .norm import RMSNorm


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,) -> cos, sin (T, head_dim/2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, h, T, hd), rotating pairs (x[2i], x[2i+1])."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, k_cache, v_cache):
        """x (B, T, D); k_cache, v_cache (B, h, S, hd) for the S earlier positions."""
        cfg = self.cfg
        bsz, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(cfg.d_model, dim=-1)
        q, k, v = (z.reshape(bsz, t, cfg.n_head, cfg.head_dim).transpose(1, 2) for z in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat([k_cache, k], dim=2)  # (B, h, S+T, hd)
        v = torch.cat([v_cache, v], dim=2)

        # causal mask over the cache and the new tokens
        s = k_cache.shape[2]
        visible = torch.arange(s + t)[None, :] <= (s + torch.arange(t))[:, None]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(cfg.head_dim)
        y = torch.matmul(torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1), v)
        x = x + self.out_proj(y.transpose(1, 2).reshape(bsz, t, cfg.d_model))
        x = x + self.proj(F.gelu(self.fc(self.norm2(x))))
        return x, k, v


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def _empty_cache(self, batch: int) -> torch.Tensor:
        cfg = self.cfg
        return torch.zeros(batch, cfg.n_head, 0, cfg.head_dim, device=self.embed.weight.device)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx: (B, T) -> logits (B, T, V) and a zero auxiliary loss (no MoE here)."""
        logits, _ = self.step(idx, self.init_state(idx.shape[0]))
        return logits, logits.new_zeros(())

    def state_names(self, part: str = "all") -> list[str]:
        return [f"layer{i}.{n}" for i in range(self.cfg.n_layer) for n in ("k_cache", "v_cache")]

    def init_state(self, batch: int = 1) -> dict[str, torch.Tensor]:
        """Allocate an empty KV cache, which grows by T positions per step."""
        state = {name: self._empty_cache(batch) for name in self.state_names()}
        state["pos"] = torch.zeros((), dtype=torch.long, device=self.embed.weight.device)
        return state

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        """tokens: (B, T), any T >= 1 -> logits (B, T, V), the state with the cache grown by T."""
        pos = state["pos"]
        t = tokens.shape[1]
        cos, sin = rope_tables(pos + torch.arange(t), self.cfg.head_dim, self.cfg.rope_base)
        x = self.embed(tokens)
        new = {}
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, cos, sin, state[f"layer{i}.k_cache"], state[f"layer{i}.v_cache"])
            new[f"layer{i}.k_cache"], new[f"layer{i}.v_cache"] = k, v
        logits = torch.matmul(self.norm_f(x), self.embed.weight.t())
        new["pos"] = pos + t
        return logits, new
