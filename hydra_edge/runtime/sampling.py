"""Choosing the next token from logits: greedy, temperature, top-k and top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UsageError(f"temperature must be 0 (greedy) or a finite positive number, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top-k must be 0 (off) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top-p must be in (0, 1], got {self.top_p}")


def sample_token(logits: np.ndarray, options: SamplingOptions, rng: np.random.Generator) -> int:
    """Pick one token id from logits (V,)."""
    if options.temperature == 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / options.temperature
    if options.top_k and options.top_k < scaled.size:
        cutoff = np.partition(scaled, -options.top_k)[-options.top_k]
        scaled = np.where(scaled < cutoff, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if options.top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, options.top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.size, p=probs))
