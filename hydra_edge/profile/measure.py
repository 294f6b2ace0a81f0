"""Running the probe once per length and bundle, each in a fresh process, within time and memory bounds."""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from ..config import config_from_dict
from ..errors import UsageError
from ..runtime.manifest import load_manifest

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_TIMEOUT = "timeout"
STATUS_MEMORY = "out of memory bound"
STATUS_FAILED = "failed"
# the parent samples the child's resident memory this often to enforce the memory bound
POLL_SECONDS = 0.05
# a probe process gets this long beyond its two time-bounded stages before it is stopped
STARTUP_ALLOWANCE_S = 60.0
MIB = 1 << 20


@dataclass
class LengthResult:
    """Measurements at one context length; a rate is None where its stage did not finish."""

    length: int
    status: str = STATUS_OK
    detail: str = ""
    prefill_tokens_done: int = 0
    prefill_seconds: float = 0.0
    prefill_tps: float | None = None
    prefill_tps_spread: float | None = None
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_tps: float | None = None
    decode_tps_spread: float | None = None
    decode_state: str | None = None  # "prefilled", or "filled" when prefill did not reach the length
    peak_rss_mib: float | None = None
    uss_mib: float | None = None
    uss_loaded_mib: float | None = None
    repeats: int = 0


@dataclass
class BundleProfile:
    """The measurements of one bundle over all lengths."""

    bundle: str
    name: str
    kind: str
    quantization: str
    threads: int
    results: list[LengthResult] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} {self.quantization}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"label": self.label}


def parse_lengths(text: str) -> list[int]:
    """Parse ``"1k,8k,64k"`` into token counts; ``k`` means 1,024 and ``m`` 1,048,576 tokens."""
    lengths = []
    for item in text.split(","):
        item = item.strip().lower()
        scale = {"k": 1 << 10, "m": 1 << 20}.get(item[-1:], 1)
        digits = item[:-1] if scale > 1 else item
        if not digits.isdigit() or int(digits) < 1:
            raise UsageError(f"invalid length {item!r} in --lengths; give positive integers with an optional "
                             "k suffix (1k = 1024 tokens), e.g. 1k,8k,64k")
        lengths.append(int(digits) * scale)
    return sorted(set(lengths))


def default_memory_limit_mib() -> int:
    """Half of this machine's physical memory, in MiB."""
    return int(psutil.virtual_memory().total / MIB / 2)


def _read_events(path: Path) -> dict[str, dict]:
    """Return the last event of each kind in a probe's event file, skipping a line cut off by a stopped process."""
    events: dict[str, dict] = {}
    if not path.is_file():
        return events
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        events[event["event"]] = event
    return events


def _watch(process: subprocess.Popen, *, hard_limit_s: float, memory_limit_mib: float) -> tuple[str, float]:
    """Wait for ``process``, stopping it past the time or memory bound; return (status, peak sampled RSS in MiB)."""
    watched = psutil.Process(process.pid)
    start = time.monotonic()
    peak = 0.0
    while process.poll() is None:
        try:
            rss = watched.memory_info().rss / MIB
        except psutil.NoSuchProcess:
            break
        peak = max(peak, rss)
        if rss > memory_limit_mib:
            process.kill()
            process.wait()
            return STATUS_MEMORY, peak
        if time.monotonic() - start > hard_limit_s:
            process.kill()
            process.wait()
            return STATUS_TIMEOUT, peak
        time.sleep(POLL_SECONDS)
    return (STATUS_OK if process.returncode == 0 else STATUS_FAILED), peak


def _probe_once(bundle: Path, length: int, *, threads: int, decode_tokens: int, time_limit_s: float,
                memory_limit_mib: float, tokens_file: Path | None, folder: Path) -> LengthResult:
    """Run one probe process and turn its events into a LengthResult."""
    events_path = folder / f"events-{length}-{time.monotonic_ns()}.jsonl"
    request = {"bundle": str(bundle), "length": length, "threads": threads, "decode_tokens": decode_tokens,
               "time_limit_s": time_limit_s, "tokens_file": str(tokens_file) if tokens_file else None,
               "events": str(events_path)}
    with open(folder / "stderr.txt", "w+", encoding="utf-8") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "hydra_edge.profile.probe", json.dumps(request)],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            status, sampled_peak = _watch(process, hard_limit_s=2 * time_limit_s + STARTUP_ALLOWANCE_S,
                                          memory_limit_mib=memory_limit_mib)
        finally:
            # an interrupted profile (Ctrl-C, an error here) leaves no probe running
            if process.poll() is None:
                process.kill()
                process.wait()
        stderr.seek(0)
        error_lines = [line for line in stderr.read().splitlines() if line.strip()]

    events = _read_events(events_path)
    result = LengthResult(length=length, status=status, repeats=1)
    progress = events.get("prefill_progress", {})
    result.prefill_tokens_done = progress.get("tokens", 0)
    result.prefill_seconds = progress.get("seconds", 0.0)
    if "loaded" in events:
        result.uss_loaded_mib = events["loaded"]["uss_bytes"] / MIB
    if "prefill" in events:
        prefill = events["prefill"]
        result.prefill_tokens_done, result.prefill_seconds = prefill["tokens"], prefill["seconds"]
        if prefill["complete"]:
            result.prefill_tps = length / prefill["seconds"]
        elif status == STATUS_OK:
            result.status = STATUS_TIMEOUT
    if "decode" in events:
        decode = events["decode"]
        result.decode_tokens, result.decode_seconds = decode["tokens"], decode["seconds"]
        result.decode_tps = decode["tokens"] / decode["seconds"]
        result.decode_state = decode["state"]
    if "done" in events:
        result.peak_rss_mib = events["done"]["peak_rss_bytes"] / MIB
        result.uss_mib = events["done"]["uss_bytes"] / MIB
    else:
        result.peak_rss_mib = sampled_peak or None

    # the reason, in words, for anything but a full measurement
    if status == STATUS_FAILED:
        result.detail = error_lines[-1] if error_lines else f"probe exited with code {process.returncode}"
    elif status == STATUS_MEMORY:
        # a run stopped over the bound measured nothing that fits in it
        if "prefill" in events:
            stage = f"during decode at {length:,} tokens of context"
        else:
            stage = f"after {result.prefill_tokens_done:,} of {length:,} prefill tokens"
        result.detail = f"resident memory passed {memory_limit_mib:,.0f} MiB {stage}"
        result.prefill_tps = result.decode_tps = None
        result.decode_state = None
    elif result.status == STATUS_TIMEOUT:
        result.detail = (f"prefill reached {result.prefill_tokens_done:,} of {length:,} tokens in "
                         f"{result.prefill_seconds:,.1f} s")
        if result.decode_state == "filled":
            result.detail += "; decode ran on a context filled to the full length"
    return result


def _combine(runs: list[LengthResult]) -> LengthResult:
    """Mean rates and largest memory over repeated runs; spread is half the range of the rates."""
    combined = runs[-1] if runs[-1].status != STATUS_OK else LengthResult(**asdict(runs[0]))
    ok = [r for r in runs if r.status == STATUS_OK]
    if len(ok) == len(runs) and len(runs) > 1:
        for key in ("prefill_tps", "decode_tps"):
            values = [getattr(r, key) for r in runs]
            setattr(combined, key, statistics.mean(values))
            setattr(combined, key + "_spread", (max(values) - min(values)) / 2)
        for key in ("peak_rss_mib", "uss_mib", "uss_loaded_mib"):
            setattr(combined, key, max(getattr(r, key) for r in runs))
        combined.prefill_seconds = statistics.mean(r.prefill_seconds for r in runs)
        combined.decode_seconds = statistics.mean(r.decode_seconds for r in runs)
    combined.repeats = len(runs)
    return combined


def _bundle_profile(bundle: Path, threads: int) -> BundleProfile:
    manifest = load_manifest(bundle, check_hashes=True)
    cfg = config_from_dict(manifest["model"])
    mode = manifest.get("quantization", {}).get("mode", "none")
    return BundleProfile(bundle=str(bundle), name=cfg.name, kind=cfg.kind,
                         quantization="float32" if mode == "none" else mode, threads=threads)


def text_tokens(bundle: Path, text: Path, count: int) -> np.ndarray:
    """Return the first ``count`` token ids of a UTF-8 text file under the bundle's tokenizer.

    Raise UsageError if the text has fewer tokens.
    """
    from ..runtime.text import iter_text_blocks, load_tokenizer

    tokenizer = load_tokenizer(bundle, load_manifest(bundle, check_hashes=False))
    ids: list[int] = []
    for block in iter_text_blocks(text):
        ids += tokenizer.encode(block).ids
        if len(ids) >= count:
            return np.array(ids[:count], dtype=np.int64)
    raise UsageError(f"{text} has {len(ids):,} tokens under the tokenizer of {bundle}, fewer than the longest "
                     f"length {count:,}; give a longer text or shorter --lengths")


def _format_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def profile_bundles(
    bundles: list[Path],
    lengths: list[int],
    *,
    threads: int = 1,
    decode_tokens: int = 32,
    repeats: int = 1,
    time_limit_s: float = 600.0,
    memory_limit_mib: float | None = None,
    text: Path | None = None,
    on_result=None,
) -> list[BundleProfile]:
    """Profile several bundles length by length, alternating between bundles at each length.

    Alternating keeps a change in machine load from favouring one bundle.
    After a length exceeds the memory bound, longer lengths of that bundle
    are not run and are recorded with the same status. After a timeout they
    still run, because decode is measured even when prefill stops early.
    ``on_result(profile, result)`` is called after each measurement.
    """
    if threads < 1 or decode_tokens < 1 or repeats < 1:
        raise UsageError(f"threads, decode tokens and repeats must be at least 1, got {threads}, {decode_tokens}, {repeats}")
    if time_limit_s <= 0:
        raise UsageError(f"time limit must be positive, got {time_limit_s} s")
    memory_limit_mib = memory_limit_mib or default_memory_limit_mib()
    profiles = [_bundle_profile(Path(b), threads) for b in bundles]
    over_memory: dict[int, int] = {}  # profile index -> the length that exceeded the memory bound

    with tempfile.TemporaryDirectory(prefix="hydra-edge-profile-") as tmp:
        folder = Path(tmp)
        token_files: list[Path | None] = [None] * len(bundles)
        if text is not None:
            for i, bundle in enumerate(bundles):
                token_files[i] = folder / f"tokens-{i}.npy"
                np.save(token_files[i], text_tokens(Path(bundle), text, max(lengths)))

        for length in sorted(lengths):
            for i, profile in enumerate(profiles):
                if i in over_memory:
                    result = LengthResult(length=length, status=STATUS_MEMORY,
                                          detail=f"not run: length {over_memory[i]:,} already exceeded the memory bound")
                else:
                    log.info("measuring %s at %d tokens ...", profile.label, length)
                    runs: list[LengthResult] = []
                    for _ in range(repeats):
                        runs.append(_probe_once(Path(profile.bundle), length, threads=threads,
                                                decode_tokens=decode_tokens, time_limit_s=time_limit_s,
                                                memory_limit_mib=memory_limit_mib, tokens_file=token_files[i],
                                                folder=folder))
                        if runs[-1].status != STATUS_OK:
                            break
                    result = _combine(runs)
                    if result.status == STATUS_MEMORY:
                        over_memory[i] = length
                log.info("%s at %d tokens: %s, prefill %s tokens/s, decode %s tokens/s, peak RSS %s MiB",
                         profile.label, length, result.status, _format_rate(result.prefill_tps),
                         _format_rate(result.decode_tps), _format_rate(result.peak_rss_mib))
                profile.results.append(result)
                if on_result is not None:
                    on_result(profile, result)
    return profiles


def profile_bundle(bundle: Path, lengths: list[int], **options) -> BundleProfile:
    """Profile one bundle; the options are those of :func:`profile_bundles`."""
    return profile_bundles([bundle], lengths, **options)[0]
