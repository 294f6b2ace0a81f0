"""Render the README's results section from the files under benchmarks/results/.

The section between the markers ``<!-- results:start -->`` and
``<!-- results:end -->`` in README.md is replaced by each results table
(with its machine line) in a fixed order; results not yet measured are
listed as such. Usage:

    python benchmarks/summary.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = [
    ("throughput", "Hydra int8 against the transformer int8 (`benchmarks/throughput.py`)"),
    ("runtime_speed", "Prefill, decode and peak memory of hydra-29m bundles (`benchmarks/runtime_speed.py`)"),
    ("memory_soak", "1,000,000-token soak of the hydra-29m int8 bundle (`benchmarks/memory_soak.py`)"),
    ("int8_quality", "int8 against float32 on trained models (`benchmarks/int8_quality.py`)"),
    ("logic_by_hops", "Logic accuracy by hop count, Hydra against the transformer (`benchmarks/logic_by_hops.py`)"),
    ("logic_by_hops_lr1e-3", "The same at learning rate 1e-3 (`benchmarks/logic_by_hops.py --lr 1e-3 --name "
                             "logic_by_hops_lr1e-3`)"),
    ("ablations", "Ablations: each component switched off on its own probe task (`benchmarks/ablations.py`)"),
    ("logic_variants", "2-hop chains: hydra-tiny variants against the goal of 0.5 within 1,000 steps "
                       "(`benchmarks/logic_variants.py`)"),
]
START, END = "<!-- results:start -->", "<!-- results:end -->"


def render() -> str:
    parts = []
    for name, title in SECTIONS:
        parts.append(f"### {title}\n")
        md = RESULTS / f"{name}.md"
        if not md.is_file():
            parts.append(f"Not measured yet: run the script to write `benchmarks/results/{name}.md`.\n")
            continue
        text = md.read_text()
        # image links in the results file are relative to benchmarks/results/
        text = re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", r"![\1](benchmarks/results/\2)", text)
        parts.append(text.strip() + "\n")
    return "\n".join(parts)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} section to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render()}{END}{tail}")
    print(f"updated the results section of {readme}")


if __name__ == "__main__":
    main()
