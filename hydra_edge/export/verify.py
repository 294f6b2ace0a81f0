"""Export's last check: the bundle under onnxruntime against the PyTorch step API.

Two streams are compared call by call, logits and every state tensor:
one from position 0 with a zero state, and one that starts mid-chunk at a
later position from a non-zero state copied out of PyTorch. Call lengths
include 1, 2, a prime below ``chunk``, ``chunk - 1`` and ``chunk``, so a
length frozen at trace time would show. Every failure is collected and
reported, nothing stops at the first one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..model.hydra import Hydra
from ..runtime.session import HydraSession

FLOAT_TOLERANCE = 1e-3
# int8 is compared with the float model by shape of the distribution, not per value
INT8_MAX_RELATIVE_RMS = 0.25
INT8_MIN_TOP1 = 0.80
# Top-1 agreement counts the positions where the float model prefers its top
# token by at least this many nats over the runner-up. Verification feeds
# random tokens, and a trained model often spreads its prediction evenly over
# such input (a logic model over the 26 letters), so a near-tie there flips
# under any rounding without saying anything about the bundle.
TOP1_MIN_MARGIN = 0.5


def largest_prime_below(n: int) -> int:
    for candidate in range(n - 1, 1, -1):
        if all(candidate % d for d in range(2, int(candidate**0.5) + 1)):
            return candidate
    return 1


def call_lengths(chunk: int, n_tokens: int) -> list[int]:
    """Call lengths covering 1, 2, a prime below chunk, chunk - 1 and chunk, none crossing a boundary."""
    p = largest_prime_below(chunk)
    pattern = [1, 2, chunk - 3, p, chunk - p, chunk - 1, 1, chunk] if chunk >= 4 else [1] * chunk
    lengths, total = [], 0
    while total < n_tokens:
        for n in pattern:
            if n > 0:
                lengths.append(n)
                total += n
    return lengths


@dataclass
class Check:
    name: str
    value: float
    limit: float
    higher_is_better: bool = False

    @property
    def ok(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit


@dataclass
class VerifyReport:
    tokens: int = 0
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        bad = self.failures()
        if not bad:
            return f"{len(self.checks)} checks passed over {self.tokens} tokens"
        return "; ".join(f"{c.name} = {c.value:.3g} (limit {c.limit:.3g})" for c in bad)


class _Stream:
    """Both sides of one comparison, fed the same calls."""

    def __init__(self, model: Hydra, session: HydraSession, state: dict[str, torch.Tensor]) -> None:
        self.model, self.session, self.state = model, session, state
        session.pos = int(state["pos"])
        session.state = {n: state[n].numpy().copy() for n in session.state}

    @torch.no_grad()
    def call(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        ref_logits, self.state = self.model.step(torch.from_numpy(tokens)[None], self.state)
        logits = self.session.step(tokens)
        state_diffs = {n: float(np.abs(self.session.state[n] - self.state[n].numpy()).max()) for n in self.session.state}
        return logits, ref_logits[0].numpy(), state_diffs


def verify_bundle(model: Hydra, bundle: Path, *, quantized: bool, n_tokens: int = 320, seed: int = 0) -> VerifyReport:
    """Compare the bundle with ``model`` on ``n_tokens`` random tokens in two streams."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    session = HydraSession(bundle, threads=1, check_hashes=True)
    report = VerifyReport()
    got, want = [], []
    worst_state: dict[str, float] = {}

    # stream 1 from position 0; stream 2 from a mid-chunk position with the state PyTorch reached there
    start = model.init_state(1)
    warm = rng.integers(0, cfg.vocab_size, 2 * cfg.chunk + 5)
    with torch.no_grad():
        _, later = model.step(torch.from_numpy(warm[: cfg.chunk])[None], start)
        _, later = model.step(torch.from_numpy(warm[cfg.chunk: 2 * cfg.chunk])[None], later)
        _, later = model.step(torch.from_numpy(warm[2 * cfg.chunk:])[None], later)
    for begin, budget in ((start, n_tokens), (later, max(n_tokens // 2, 1))):
        stream = _Stream(model, session, begin)
        offset = int(begin["pos"]) % cfg.chunk
        for n in call_lengths(cfg.chunk, budget):
            n = min(n, cfg.chunk - offset)
            tokens = rng.integers(0, cfg.vocab_size, n).astype(np.int64)
            logits, ref, diffs = stream.call(tokens)
            got.append(logits)
            want.append(ref)
            for name, d in diffs.items():
                worst_state[name] = max(worst_state.get(name, 0.0), d)
            offset = (offset + n) % cfg.chunk
            report.tokens += n

    got_all, want_all = np.concatenate(got), np.concatenate(want)
    if quantized:
        report.checks += int8_checks(got_all, want_all)
    else:
        report.checks.append(Check("logits max abs diff", float(np.abs(got_all - want_all).max()), FLOAT_TOLERANCE))
        for name, d in worst_state.items():
            report.checks.append(Check(f"{name} max abs diff", d, FLOAT_TOLERANCE))
    return report


def int8_checks(got: np.ndarray, want: np.ndarray) -> list[Check]:
    """Compare int8 logits ``got`` with float logits ``want``, both (N, V): relative RMS error and top-1 agreement.

    Top-1 agreement is over the positions where the float model is decided
    (see TOP1_MIN_MARGIN), or over all positions when there are none, as with
    a random-weight model whose logits are all close together.
    """
    centred = want - want.mean(-1, keepdims=True)
    relative_rms = float(np.sqrt(np.mean((got - want) ** 2)) / (np.sqrt(np.mean(centred**2)) + 1e-12))

    top2 = np.sort(want, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] >= TOP1_MIN_MARGIN
    if not decided.any():
        decided[:] = True
    top1 = float(np.mean(got[decided].argmax(-1) == want[decided].argmax(-1)))
    return [
        Check("logits relative RMS error vs float", relative_rms, INT8_MAX_RELATIVE_RMS),
        Check("top-1 agreement vs float", top1, INT8_MIN_TOP1, higher_is_better=True),
    ]
