"""Turning profiles into a table, a JSON document and throughput ratios."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from .measure import STATUS_OK, BundleProfile, LengthResult

JSON_FORMAT = "hydra-edge-profile/1"


def machine_info() -> dict[str, Any]:
    """CPU model, core count and library versions, recorded beside every figure."""
    import numpy
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def ratios(model: BundleProfile, baseline: BundleProfile) -> list[dict[str, Any]]:
    """Per length, the model's prefill and decode rates divided by the baseline's (None where either is missing)."""
    out = []
    base = {r.length: r for r in baseline.results}
    for r in model.results:
        b = base.get(r.length)
        entry = {"length": r.length, "prefill": None, "decode": None}
        if b is not None:
            if r.prefill_tps and b.prefill_tps:
                entry["prefill"] = r.prefill_tps / b.prefill_tps
            if r.decode_tps and b.decode_tps:
                entry["decode"] = r.decode_tps / b.decode_tps
        out.append(entry)
    return out


def profile_document(profiles: list[BundleProfile], settings: dict[str, Any]) -> dict[str, Any]:
    """Build the JSON document of ``hydra-edge profile``: machine, settings, every bundle's results and the ratios."""
    doc: dict[str, Any] = {
        "format": JSON_FORMAT,
        "machine": machine_info(),
        "settings": settings,
        "bundles": [p.to_dict() for p in profiles],
    }
    if len(profiles) == 2:
        doc["ratios"] = {"model": profiles[0].label, "baseline": profiles[1].label,
                         "by_length": ratios(profiles[0], profiles[1])}
    return doc


def write_json(path: Path, doc: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def format_length(n: int) -> str:
    """1024 -> "1K", 65536 -> "64K", 1000 -> "1,000"."""
    return f"{n >> 10}K" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def _rate(value: float | None, spread: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f} ± {spread:,.1f}" if spread is not None else f"{value:,.1f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def table_rows(profiles: list[BundleProfile]) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, one row per bundle and length, and footnotes explaining every status other than ok."""
    headers = ["bundle", "length", "prefill tok/s", "decode tok/s", "peak RSS MiB", "USS MiB", "status"]
    rows, notes = [], []
    lengths = sorted({r.length for p in profiles for r in p.results})
    for length in lengths:
        for profile in profiles:
            r: LengthResult | None = next((x for x in profile.results if x.length == length), None)
            if r is None:
                continue
            decode = _rate(r.decode_tps, r.decode_tps_spread)
            if r.decode_state == "filled":
                decode += " *"
            rows.append([profile.label, format_length(length), _rate(r.prefill_tps, r.prefill_tps_spread), decode,
                         _mib(r.peak_rss_mib), _mib(r.uss_mib), r.status])
            if r.status != STATUS_OK:
                notes.append(f"{profile.label} at {format_length(length)}: {r.status}: {r.detail}")
    if any(r.decode_state == "filled" for p in profiles for r in p.results):
        notes.append("* decode measured on a context filled to the full length, because prefill stopped at the time limit")
    return headers, rows, notes


def ratio_rows(profiles: list[BundleProfile]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the model-to-baseline ratios, for exactly two profiles."""
    headers = ["length", "prefill ratio", "decode ratio"]
    rows = []
    for entry in ratios(profiles[0], profiles[1]):
        rows.append([format_length(entry["length"]),
                     "-" if entry["prefill"] is None else f"{entry['prefill']:.2f}x",
                     "-" if entry["decode"] is None else f"{entry['decode']:.2f}x"])
    return headers, rows
