"""Shared parts of the benchmark scripts: machine description, random bundles, results files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU, cores, library versions and commit, recorded beside every figure."""
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
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def random_bundle(preset: str, quantize: str, folder: Path, seed: int = 0) -> Path:
    """Export a Hydra preset with seeded random weights (as llama.cpp benchmarks random models).

    NOTE: a bundle already in ``folder`` is reused as it is, even when an older
    exporter wrote it. Delete the folder after changing export code.
    """
    import torch

    from hydra_edge.config import get_preset
    from hydra_edge.export.bundle import ExportOptions, export_model
    from hydra_edge.model import build_model
    from hydra_edge.train.tokenizer import build_logic_tokenizer

    out = folder / f"{preset}-{quantize}-seed{seed}"
    if (out / "hydra.json").is_file():
        return out
    torch.manual_seed(seed)
    model = build_model(get_preset(preset)).eval()
    export_model(model, build_logic_tokenizer().to_str(), out, ExportOptions(quantize=quantize, verify_tokens=130),
                 task="random", source=f"random {preset}, seed {seed}")
    return out


def write_results(name: str, data: dict, table: str) -> None:
    """Write results/NAME.json and results/NAME.md (the table with its machine line)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    m = data["machine"]
    header = (f"{m['cpu']}, {m['cores']} cores, {m['machine']}; onnxruntime {m['onnxruntime']}, "
              f"numpy {m['numpy']}, Python {m['python']}; commit {m['commit']}; {m['date']}\n\n")
    (RESULTS / f"{name}.md").write_text(header + table + "\n")
    print(table)
    print(f"wrote {RESULTS / name}.json and .md", file=sys.stderr)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
