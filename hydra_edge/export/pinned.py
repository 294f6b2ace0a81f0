"""Pinned expert routing: keep per MoE block only the experts a calibration text uses.

The rule: run the calibration text through the model, add up each expert's
route weight over all chunks (its routing mass), and keep the experts with
the largest mass until they carry ``pin_mass`` of the block's total, and at
least ``top_k`` of them. The router then chooses among the kept experts only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..model.hydra import Hydra

log = logging.getLogger(__name__)

MAX_CALIB_TOKENS = 16384


@dataclass
class PinResult:
    """Experts kept per block and the quality change on the calibration text."""

    kept: dict[str, list[int]] = field(default_factory=dict)
    mass: dict[str, list[float]] = field(default_factory=dict)
    calib_tokens: int = 0
    loss_before: float = 0.0
    loss_after: float = 0.0

    @property
    def perplexity_change(self) -> float:
        """Relative perplexity change, e.g. 0.02 for 2 % worse."""
        return math.exp(self.loss_after - self.loss_before) - 1.0


def read_calibration_tokens(path: Path, tokenizer_json: str) -> torch.Tensor:
    """Tokenize the calibration text (at most MAX_CALIB_TOKENS tokens); raise UsageError if unusable."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"calibration file {path} is {'a folder' if path.is_dir() else 'not found'}; give a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"calibration file {path} is not UTF-8 text") from None
    ids = Tokenizer.from_str(tokenizer_json).encode(text).ids[:MAX_CALIB_TOKENS]
    if len(ids) < 2:
        raise UsageError(f"calibration file {path} has fewer than 2 tokens; give it some text")
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def _routing_mass(model: Hydra, ids: torch.Tensor) -> tuple[float, dict[int, torch.Tensor]]:
    """Loss on ``ids`` and, per MoE block, each expert's summed route weight."""
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for block in model.blocks:
        if block.moe is None:
            continue
        moe = block.moe

        def capture(module, args, _out, index=block.index):
            (u,) = args
            cfg = module.cfg
            pad = (-u.shape[1]) % cfg.chunk
            means = F.pad(u, (0, 0, 0, pad)).reshape(u.shape[0], -1, cfg.chunk, u.shape[-1]).sum(2) / cfg.chunk
            logits = torch.cat([module.default_logits.expand(u.shape[0], 1, -1), module.router(means)[:, :-1]], 1)
            idx, weight = module.route(logits)
            mass = torch.zeros(module.n_experts)
            captured[index] = mass.index_add_(0, idx.flatten(), weight.flatten())

        hooks.append(moe.register_forward_hook(capture))
    try:
        logits, _ = model(ids[None, :-1])
    finally:
        for h in hooks:
            h.remove()
    loss = F.cross_entropy(logits[0], ids[1:]).item()
    return loss, captured


def pin_experts(model: Hydra, tokenizer_json: str, calib: Path, pin_mass: float) -> PinResult:
    """Pin ``model``'s experts in place by the rule above; return what was kept and the quality change."""
    ids = read_calibration_tokens(calib, tokenizer_json)
    loss_before, masses = _routing_mass(model, ids)
    result = PinResult(calib_tokens=len(ids), loss_before=loss_before)
    for index, mass in masses.items():
        moe = model.blocks[index].moe
        order = torch.argsort(mass, descending=True).tolist()
        share = torch.cumsum(mass[order], 0) / mass.sum().clamp_min(1e-12)
        n_keep = min(len(order), max(moe.cfg.top_k, int((share < pin_mass).sum().item()) + 1))
        keep = sorted(order[:n_keep])
        result.mass[f"layer{index}"] = [round(float(m), 4) for m in mass]
        moe.pin(keep)
        result.kept[f"layer{index}"] = moe.expert_ids
        log.info("layer%d: keeping experts %s of %d", index, moe.expert_ids, len(mass))
    result.loss_after, _ = _routing_mass(model, ids)
    return result
