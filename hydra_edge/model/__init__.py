"""PyTorch models: Hydra and the transformer baseline."""

from __future__ import annotations

from torch import nn

from ..config import HydraConfig, ModelConfig, TransformerConfig
from .hydra import Hydra
from .transformer import Transformer


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model a config describes, with fresh random weights."""
    if isinstance(cfg, HydraConfig):
        return Hydra(cfg)
    if isinstance(cfg, TransformerConfig):
        return Transformer(cfg)
    raise TypeError(f"not a model config: {type(cfg).__name__}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["Hydra", "Transformer", "build_model", "count_parameters"]
