"""Parameter counts per component and streaming-state sizes, for ``hydra-edge info``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..config import HydraConfig, ModelConfig, TransformerConfig, hydra_state_spec, state_bytes

FLOAT32_BYTES = 4

# submodules of a block, by model kind, and the component each counts towards
BLOCK_PARTS = {
    "hydra": {"ssm": "ssm", "sga": "sga", "moe": "moe", "controller": "controllers + norms", "norm": "controllers + norms"},
    "transformer": {"qkv": "attention", "out_proj": "attention", "fc": "mlp", "proj": "mlp",
                    "norm1": "norms", "norm2": "norms"},
}
TOP_PARTS = {
    "hydra": {"embed": "embedding", "workspace": "workspace", "pkm": "pkm", "norm_f": "controllers + norms"},
    "transformer": {"embed": "embedding", "norm_f": "norms"},
}
BLOCK_PARAM = re.compile(r"blocks\.(\d+)\.([A-Za-z0-9_]+)\.")


@dataclass
class ComponentCount:
    """Parameters of one component type, summed over the modules of that type."""

    component: str
    modules: int
    parameters: int


def _component_of(name: str, kind: str) -> tuple[str, str]:
    """Return (component, owner) of parameter ``name``, e.g. ("ssm", "blocks.2") or ("pkm", "pkm")."""
    match = BLOCK_PARAM.match(name)
    if match:
        part = match.group(2)
        return BLOCK_PARTS[kind].get(part, part), f"blocks.{match.group(1)}"
    top = name.split(".", 1)[0]
    return TOP_PARTS[kind].get(top, top), top


def count_by_component(model: nn.Module, cfg: ModelConfig) -> list[ComponentCount]:
    """Count parameters per component type, in the order the components first appear in the model.

    ``modules`` is the number of blocks that have the component, plus one for
    each top-level module of that type. The embedding is counted once, because
    the output head reuses its matrix.
    """
    counts: dict[str, ComponentCount] = {}
    owners: dict[str, set[str]] = {}
    for name, param in model.named_parameters():
        component, owner = _component_of(name, cfg.kind)
        entry = counts.setdefault(component, ComponentCount(component, 0, 0))
        entry.parameters += param.numel()
        owners.setdefault(component, set()).add(owner)
    for component, entry in counts.items():
        entry.modules = len(owners[component])
    # the embedding first, then blocks, memories and norms as they occur
    return sorted(counts.values(), key=lambda c: c.component != "embedding")


def state_size(cfg: ModelConfig) -> tuple[str, int]:
    """Return a label and a byte count: the fixed Hydra state per sequence, or the KV cache per token."""
    if isinstance(cfg, HydraConfig):
        return "state per sequence (fixed)", state_bytes(hydra_state_spec(cfg, batch=1))
    if isinstance(cfg, TransformerConfig):
        # one key and one value vector of width d_model per block, in float32
        return "KV cache per token (grows with context)", cfg.n_layer * 2 * cfg.d_model * FLOAT32_BYTES
    raise TypeError(f"not a model config: {type(cfg).__name__}")
