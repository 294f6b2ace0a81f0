"""Model configurations, named presets and the streaming state layout.

This module imports no torch: the runtime reads the same config from a
bundle's manifest to allocate the state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UsageError

ModelKind = Literal["hydra", "transformer"]

# components an ablation study may switch off (see HydraConfig.ablate)
ABLATABLE = ("sga", "moe", "workspace", "pkm")


@dataclass(frozen=True)
class HydraConfig:
    """Hyperparameters of a Hydra model.

    Blocks are numbered from 0. Block ``i`` has an SGA path when
    ``(i + 1) % sga_every == 0`` and an MoE path when ``(i + 1) % moe_every == 0``.
    """

    name: str = "hydra-29m"

    # vocabulary, width, depth
    vocab_size: int = 8192
    d_model: int = 384
    n_layer: int = 8
    # Routing, workspace writes and global-slot pooling happen once per chunk of
    # this many tokens; a step call never crosses a chunk boundary.
    chunk: int = 64
    norm_eps: float = 1e-5

    # SSM (Mamba-2 SSD)
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    # SGA (sparse global attention)
    sga_every: int = 4
    sga_heads: int = 6
    window: int = 128
    n_global: int = 16

    # MoE (chunk-routed SwiGLU experts)
    moe_every: int = 2
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 288

    # workspace
    ws_slots: int = 16
    ws_dim: int = 128
    ws_after: int = -1  # block index the workspace follows; -1 means the middle block

    # PKM (product-key memory)
    pkm_after: int = -1  # block index the PKM follows; -1 means the block at 3/4 depth
    pkm_subkeys: int = 128  # sub-keys per half: the value table has pkm_subkeys**2 rows
    pkm_dim: int = 128  # query width, split into two halves
    pkm_topk: int = 8

    # controller gate biases: sigmoid(-3) = 0.047 keeps new paths small at init
    gate_bias_ssm: float = 2.0
    gate_bias_aux: float = -3.0

    # Components switched off for an ablation study: SGA and MoE paths are not
    # built, the workspace and the PKM are skipped. Such a model trains and
    # evaluates in PyTorch; export rejects it.
    ablate: tuple[str, ...] = ()

    kind: ModelKind = field(default="hydra", init=False)

    def __post_init__(self) -> None:
        if self.ws_after == -1:
            object.__setattr__(self, "ws_after", self.n_layer // 2 - 1)
        if self.pkm_after == -1:
            object.__setattr__(self, "pkm_after", 3 * self.n_layer // 4 - 1)
        sizes = ("vocab_size", "d_model", "n_layer", "chunk", "d_state", "d_conv", "expand", "headdim", "sga_every",
                 "sga_heads", "window", "n_global", "moe_every", "n_experts", "d_expert", "ws_slots", "ws_dim",
                 "pkm_subkeys", "pkm_dim")
        for name in sizes:
            if getattr(self, name) < 1:
                raise UsageError(f"invalid config {self.name!r}: {name} must be at least 1, got {getattr(self, name)}")
        checks = [
            (self.d_inner % self.headdim == 0, "expand * d_model must be a multiple of headdim"),
            (self.d_model % self.sga_heads == 0, "d_model must be a multiple of sga_heads"),
            (self.window >= self.chunk, "window must be at least chunk"),
            (1 <= self.top_k <= self.n_experts, "top_k must be between 1 and n_experts"),
            (self.pkm_dim % 2 == 0, "pkm_dim must be even"),
            (1 <= self.pkm_topk <= self.pkm_subkeys, "pkm_topk must be between 1 and pkm_subkeys"),
            (0 <= self.ws_after < self.n_layer, "ws_after must name a block"),
            (0 <= self.pkm_after < self.n_layer - 1, "pkm_after must name a block before the last"),
            (self.d_conv >= 2, "d_conv must be at least 2"),
        ]
        for ok, rule in checks:
            if not ok:
                raise UsageError(f"invalid config {self.name!r}: {rule}")
        unknown = [c for c in self.ablate if c not in ABLATABLE]
        if unknown:
            raise UsageError(f"invalid config {self.name!r}: cannot ablate {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(ABLATABLE)}")
        object.__setattr__(self, "ablate", tuple(sorted(set(self.ablate))))

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        # the convolution runs over x, B and C together (one group of B and C)
        return self.d_inner + 2 * self.d_state

    @property
    def sga_headdim(self) -> int:
        return self.d_model // self.sga_heads

    @property
    def pkm_size(self) -> int:
        return self.pkm_subkeys**2

    def has_sga(self, i: int) -> bool:
        return "sga" not in self.ablate and (i + 1) % self.sga_every == 0

    def has_moe(self, i: int) -> bool:
        return "moe" not in self.ablate and (i + 1) % self.moe_every == 0


@dataclass(frozen=True)
class TransformerConfig:
    """A plain pre-norm decoder with rotary positions, the equal-sized baseline."""

    name: str = "transformer-29m"
    vocab_size: int = 8192
    d_model: int = 384
    n_layer: int = 8
    n_head: int = 6
    d_ff: int = 3456
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # kept for the runtime's feeding loop; a transformer call may cross it freely
    chunk: int = 64

    kind: ModelKind = field(default="transformer", init=False)

    def __post_init__(self) -> None:
        if self.d_model % self.n_head != 0 or (self.d_model // self.n_head) % 2 != 0:
            raise UsageError(f"invalid config {self.name!r}: d_model / n_head must be an even integer")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


ModelConfig = HydraConfig | TransformerConfig

PRESETS: dict[str, ModelConfig] = {
    "hydra-29m": HydraConfig(),
    "transformer-29m": TransformerConfig(),
    "hydra-tiny": HydraConfig(
        name="hydra-tiny", vocab_size=512, d_model=64, n_layer=4, chunk=16,
        d_state=16, headdim=16, sga_every=2, sga_heads=4, window=32, n_global=4,
        n_experts=4, top_k=2, d_expert=64, ws_slots=8, ws_dim=32,
        pkm_subkeys=16, pkm_dim=32, pkm_topk=4,
    ),
    "transformer-tiny": TransformerConfig(
        name="transformer-tiny", vocab_size=512, d_model=64, n_layer=4, n_head=4, d_ff=256, chunk=16,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """Return the preset called ``name``; raise UsageError listing the valid names."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["kind"] = cfg.kind
    return out


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Build a config from ``config_to_dict`` output; raise UsageError on unknown fields."""
    if not isinstance(data, dict):
        raise UsageError("model config must be a mapping")
    data = dict(data)
    kind = data.pop("kind", "hydra")
    cls = {"hydra": HydraConfig, "transformer": TransformerConfig}.get(kind)
    if cls is None:
        raise UsageError(f"unknown model kind {kind!r}; expected 'hydra' or 'transformer'")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(f"unknown {kind} config fields: {', '.join(unknown)}")
    if "ablate" in data:
        ablate = data["ablate"]
        if not isinstance(ablate, (list, tuple)) or not all(isinstance(c, str) for c in ablate):
            raise UsageError(f"{kind} config field ablate must be a list of component names, got {ablate!r}")
        data["ablate"] = tuple(ablate)  # JSON stores the tuple as a list
    for name, value in data.items():
        if name == "ablate":
            continue
        expected = {"int": int, "float": (int, float), "str": str}.get(str(fields[name].type))
        if expected is not None and (isinstance(value, bool) or not isinstance(value, expected)):
            raise UsageError(f"{kind} config field {name} must be {fields[name].type}, got {value!r}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise UsageError(f"invalid {kind} config: {exc}") from None


@dataclass(frozen=True)
class StateTensor:
    """One tensor of the streaming state: its name, shape (batch first) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


def hydra_state_spec(cfg: HydraConfig, batch: int = 1) -> list[StateTensor]:
    """List every state tensor of a Hydra stream, in the order the graphs use.

    The position is not in this list: it is its own graph input. A stream
    starts at position 0 with every tensor zero; there the model substitutes
    its learned initial workspace slots and route for the zeros.
    """
    b, d, h = batch, cfg.d_model, cfg.sga_heads
    spec: list[StateTensor] = []
    for i in range(cfg.n_layer):
        spec += [
            StateTensor(f"layer{i}.conv_state", (b, cfg.conv_dim, cfg.d_conv - 1)),
            StateTensor(f"layer{i}.ssm_state", (b, cfg.nheads, cfg.headdim, cfg.d_state)),
        ]
        if cfg.has_sga(i):
            hd = cfg.sga_headdim
            spec += [
                StateTensor(f"layer{i}.k_cache", (b, h, cfg.window, hd)),
                StateTensor(f"layer{i}.v_cache", (b, h, cfg.window, hd)),
                StateTensor(f"layer{i}.k_global", (b, h, cfg.n_global, hd)),
                StateTensor(f"layer{i}.v_global", (b, h, cfg.n_global, hd)),
                StateTensor(f"layer{i}.k_pool", (b, h, hd)),
                StateTensor(f"layer{i}.v_pool", (b, h, hd)),
            ]
        if cfg.has_moe(i):
            spec += [
                StateTensor(f"layer{i}.route_logits", (b, cfg.n_experts)),
                StateTensor(f"layer{i}.route_input_sum", (b, d)),
            ]
        if i == cfg.ws_after:
            spec += [
                StateTensor("workspace.slots", (b, cfg.ws_slots, d)),
                StateTensor("workspace.write_sum", (b, cfg.ws_slots, d)),
                StateTensor("workspace.write_mass", (b, cfg.ws_slots)),
            ]
    return spec


def state_bytes(spec: list[StateTensor]) -> int:
    """Size of a state in bytes (float32 and int64 tensors only)."""
    sizes = {"float32": 4, "int64": 8}
    total = 0
    for t in spec:
        n = 1
        for s in t.shape:
            n *= s
        total += n * sizes[t.dtype]
    return total
