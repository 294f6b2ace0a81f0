"""Throughput and memory of hydra-29m int8 against the transformer-29m int8 baseline at 1K, 8K and 64K tokens.

Both bundles come from seeded random weights (speed does not depend on
training) and carry the same byte-level BPE tokenizer of 8,192 tokens,
trained on the WikiText-2 test text (the logic task's tokenizer when that
text is absent). Two workloads, each run with the
library behind ``hydra-edge profile``:

- synthetic: random token ids;
- wikitext: the tokens of the WikiText-2 test text (skipped with a message
  when the file is absent).

At every length the two bundles alternate, each in a fresh process with the
same runtime, thread count and quantization, so each ratio comes from one
run. A transformer prefill that passes --time-limit stops there and is
reported as a timeout with the tokens it reached. Its decode is then
measured on a cache filled to the full length. Usage:

    python benchmarks/throughput.py [--lengths 1k,8k,64k] [--threads 1] [--time-limit 1800]
        [--repeats 1] [--wikitext ../shared/data/wikitext-2/test.txt]

Writes results/throughput.json, results/throughput.md and one PNG per workload.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_results  # noqa: E402

log = logging.getLogger("throughput")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
PRESETS = ("hydra-29m", "transformer-29m")
VOCAB_SIZE = 8192
# project goals for the comparison, checked in the Markdown summary
GOAL_PREFILL_RATIO_AT = (8192, 3.0)
GOAL_DECODE_RATIO_AT = (65536, 10.0)


def export_bundles(folder: Path, tokenizer_json: str, tag: str, seed: int) -> dict[str, Path]:
    """Export both presets with seeded random weights and int8 weights; reuse bundles already in ``folder``."""
    import torch

    from hydra_edge.config import get_preset
    from hydra_edge.export.bundle import ExportOptions, export_model
    from hydra_edge.export.transformer import export_transformer
    from hydra_edge.model import build_model

    bundles = {}
    for preset in PRESETS:
        out = folder / f"{preset}-int8-{tag}-seed{seed}"
        bundles[preset] = out
        if (out / "hydra.json").is_file():
            log.info("reusing %s", out)
            continue
        torch.manual_seed(seed)
        model = build_model(get_preset(preset)).eval()
        exporter = export_transformer if model.cfg.kind == "transformer" else export_model
        exporter(model, tokenizer_json, out, ExportOptions(quantize="int8", verify_tokens=130),
                 task="random", source=f"random {preset}, seed {seed}")
    return bundles


def bpe_tokenizer(text: Path, folder: Path) -> str:
    """Train the byte-level BPE tokenizer of 8,192 tokens on ``text``, or read it from its cache in ``folder``."""
    from hydra_edge.train.tokenizer import train_bpe_tokenizer

    cached = folder / f"{text.stem}-bpe-{VOCAB_SIZE}.json"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    tokenizer_json = train_bpe_tokenizer([text.read_text(encoding="utf-8")], VOCAB_SIZE).to_str()
    cached.write_text(tokenizer_json, encoding="utf-8")
    return tokenizer_json


def cell(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if spread is None else f"{value:,.1f} ± {spread:,.1f}"


def ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def workload_table(profiles) -> tuple[str, list[str]]:
    """Build the Markdown table of one workload (one row per length) and its notes."""
    from hydra_edge.profile import ratios
    from hydra_edge.profile.report import format_length

    hydra, base = profiles
    ratio = {r["length"]: r for r in ratios(hydra, base)}
    rows, notes = [], []
    for h, b in zip(hydra.results, base.results):
        decode_b = cell(b.decode_tps, b.decode_tps_spread) + (" *" if b.decode_state == "filled" else "")
        rows.append([
            format_length(h.length),
            cell(h.prefill_tps, h.prefill_tps_spread), cell(b.prefill_tps, b.prefill_tps_spread),
            ratio_cell(ratio[h.length]["prefill"]),
            cell(h.decode_tps, h.decode_tps_spread), decode_b, ratio_cell(ratio[h.length]["decode"]),
            f"{cell(h.peak_rss_mib)} / {cell(h.uss_mib)}", f"{cell(b.peak_rss_mib)} / {cell(b.uss_mib)}",
        ])
        for profile, r in ((hydra, h), (base, b)):
            if r.status != "ok":
                notes.append(f"{profile.label} at {format_length(r.length)}: {r.status}: {r.detail}")
    if any(r.decode_state == "filled" for r in base.results):
        notes.append("* decode on a cache filled to the full length, because prefill stopped at the time limit")
    headers = ["length", "Hydra prefill tok/s", "transformer prefill tok/s", "prefill ratio",
               "Hydra decode tok/s", "transformer decode tok/s", "decode ratio",
               "Hydra peak RSS / USS MiB", "transformer peak RSS / USS MiB"]
    return markdown_table(headers, rows), notes


def goal_lines(profiles) -> list[str]:
    """List each goal with its measured value and whether it was met."""
    from hydra_edge.profile import ratios

    hydra, base = profiles
    by_length = {r["length"]: r for r in ratios(hydra, base)}
    lines = []
    for key, (length, goal) in (("prefill", GOAL_PREFILL_RATIO_AT), ("decode", GOAL_DECODE_RATIO_AT)):
        value = by_length.get(length, {}).get(key)
        if length not in by_length:
            lines.append(f"- {key} ratio at {length:,} tokens: not measured (length not in --lengths)")
        elif value is None:
            lines.append(f"- {key} ratio at {length:,} tokens: no ratio, one side has no measurement (see notes)")
        else:
            verdict = "met" if value >= goal else "NOT met"
            lines.append(f"- {key} ratio at {length:,} tokens: {value:.2f}x, goal at least {goal:g}x: {verdict}")
    for profile in profiles:
        uss = [r.uss_mib for r in profile.results if r.uss_mib is not None]
        if uss:
            lines.append(f"- {profile.label} private memory (USS) from {min(uss):,.0f} to {max(uss):,.0f} MiB "
                         f"over the measured lengths")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1k,8k,64k", help="context lengths, k = 1024 tokens")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for both bundles")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded after each prefill")
    parser.add_argument("--repeats", type=int, default=1, help="runs per bundle, length and workload")
    parser.add_argument("--time-limit", type=float, default=1800.0,
                        help="seconds each prefill (and each decode) may take before it is reported as a timeout")
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="MiB of resident memory per run [default: half the physical memory]")
    parser.add_argument("--wikitext", type=Path, default=DEFAULT_WIKITEXT, help="WikiText-2 test text")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--bundles", type=Path, default=Path(tempfile.gettempdir()) / "hydra-edge-bench",
                        help="folder of the exported bundles, reused across runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("hydra_edge", "throughput"):
        logging.getLogger(name).setLevel(logging.INFO)

    from hydra_edge.profile import parse_lengths, profile_bundles, profile_document
    from hydra_edge.profile.plot import plot_profiles

    lengths = parse_lengths(args.lengths)
    args.bundles.mkdir(parents=True, exist_ok=True)
    text = args.wikitext if args.wikitext.is_file() else None
    if text is not None:
        bundles = export_bundles(args.bundles, bpe_tokenizer(text, args.bundles), "wikitext-bpe", args.seed)
    else:
        # the tokenizer does not change the speed of random token ids
        from hydra_edge.train.tokenizer import build_logic_tokenizer

        log.warning("%s not found: running the synthetic workload only", args.wikitext)
        bundles = export_bundles(args.bundles, build_logic_tokenizer().to_str(), "logic-tokenizer", args.seed)

    workloads = {"synthetic": None} | ({"wikitext": text} if text is not None else {})
    settings = {"lengths": lengths, "threads": args.threads, "decode_tokens": args.decode_tokens,
                "repeats": args.repeats, "time_limit_s": args.time_limit, "memory_limit_mib": args.memory_limit,
                "seed": args.seed, "wikitext": str(text) if text else None}
    data = {"machine": machine(), "workload": settings, "runs": {}}
    sections = []
    for name, source in workloads.items():
        profiles = profile_bundles([bundles[p] for p in PRESETS], lengths, threads=args.threads,
                                   decode_tokens=args.decode_tokens, repeats=args.repeats,
                                   time_limit_s=args.time_limit, memory_limit_mib=args.memory_limit, text=source)
        data["runs"][name] = profile_document(profiles, settings | {"tokens": str(source) if source else "random"})
        RESULTS.mkdir(parents=True, exist_ok=True)
        plot_profiles(profiles, RESULTS / f"throughput-{name}.png",
                      title=f"{name} tokens, {args.threads} thread(s), int8, {data['machine']['cpu']}")
        table, notes = workload_table(profiles)
        described = "random token ids" if source is None else "tokens of the WikiText-2 test text"
        section = [f"### {name}: {described}", "", table, ""]
        section += [f"- {note}" for note in notes] + goal_lines(profiles)
        section += ["", f"![{name}](throughput-{name}.png)"]
        sections.append("\n".join(section))

    write_results("throughput", data, "\n\n".join(sections))


if __name__ == "__main__":
    main()
