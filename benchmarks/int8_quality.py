"""Quality of int8 bundles against their float32 bundles, for a trained text and a trained logic model.

Text: both bundles stream the same held-out text; the script reports top-1
next-token agreement and both perplexities. Logic: both bundles stream the
same held-out problems (packed one after another, as in training) and the
script reports accuracy by hop count. Usage:

    python benchmarks/int8_quality.py --text-checkpoint text.pt --eval-text test.txt \\
        --logic-checkpoint logic.pt [--tokens 20000] [--problems 800]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_results  # noqa: E402


def export_pair(checkpoint: Path, folder: Path) -> dict[str, Path]:
    from hydra_edge.export.bundle import ExportOptions, export_model
    from hydra_edge.train.checkpoint import load_checkpoint

    model, _, tokenizer, meta = load_checkpoint(checkpoint)
    out = {}
    for quantize in ("none", "int8"):
        out[quantize] = folder / f"{checkpoint.stem}-{quantize}"
        export_model(model, tokenizer.to_str(), out[quantize], ExportOptions(quantize=quantize, force=True),
                     task=meta["task"], source=str(checkpoint))
    return out


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return lse - logits[np.arange(len(targets)), targets]


def text_quality(bundles: dict[str, Path], eval_text: Path, n_tokens: int) -> dict:
    from hydra_edge.runtime import HydraSession
    from hydra_edge.runtime.text import load_tokenizer

    sessions = {q: HydraSession(b) for q, b in bundles.items()}
    tokenizer = load_tokenizer(bundles["none"], sessions["none"].manifest)
    ids = np.array(tokenizer.encode(eval_text.read_text(encoding="utf-8")).ids[: n_tokens + 1], dtype=np.int64)
    logits = {q: s.feed(ids[:-1], all_logits=True) for q, s in sessions.items()}
    losses = {q: float(nll(l, ids[1:]).mean()) for q, l in logits.items()}
    agree = float(np.mean(logits["none"].argmax(-1) == logits["int8"].argmax(-1)))
    return {"tokens": int(len(ids) - 1), "top1_agreement": agree,
            "perplexity_f32": float(np.exp(losses["none"])), "perplexity_int8": float(np.exp(losses["int8"])),
            "perplexity_change": float(np.exp(losses["int8"] - losses["none"]) - 1)}


def logic_quality(bundles: dict[str, Path], n_problems: int, seed: int = 20261204) -> dict:
    from hydra_edge.runtime import HydraSession
    from hydra_edge.train.logic import LogicTask, make_problem

    task = LogicTask(vocab_size=10**6, seq_len=4096, max_hops=8, n_distractors=4, seed=seed)
    rng = random.Random(seed)
    problems = [make_problem(rng, 1 + i % 8, task.n_distractors) for i in range(n_problems)]
    out = {}
    for quantize, bundle in bundles.items():
        session = HydraSession(bundle)
        correct = np.zeros(9)
        total = np.zeros(9)
        for problem in problems:
            ids = task.problem_ids(problem)
            answer_at = len(ids) - 3  # predicts the answer from the arrow after the start letter
            logits = session.feed(ids, all_logits=True)
            correct[problem.hops] += int(logits[answer_at - 1].argmax() == ids[answer_at])
            total[problem.hops] += 1
        out[quantize] = {int(k): float(correct[k] / total[k]) for k in range(1, 9)}
        out[quantize]["all"] = float(correct.sum() / total.sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-checkpoint", type=Path, required=True)
    parser.add_argument("--eval-text", type=Path, required=True)
    parser.add_argument("--logic-checkpoint", type=Path, default=None, help="skipped when absent")
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--problems", type=int, default=800)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        text = text_quality(export_pair(args.text_checkpoint, Path(tmp)), args.eval_text, args.tokens)
        logic = logic_quality(export_pair(args.logic_checkpoint, Path(tmp)), args.problems) if args.logic_checkpoint else None

    lines = [
        f"Text model {args.text_checkpoint.name}, {text['tokens']:,} tokens of {args.eval_text.name}:",
        "",
        markdown_table(["measure", "float32", "int8"], [
            ["perplexity", f"{text['perplexity_f32']:.3f}", f"{text['perplexity_int8']:.3f}"],
            ["perplexity change", "", f"{text['perplexity_change']:+.2%}"],
            ["top-1 agreement with float32", "", f"{text['top1_agreement']:.2%}"],
        ]),
    ]
    if logic is not None:
        lines += [
            "",
            f"Logic model {args.logic_checkpoint.name}, {args.problems} held-out problems:",
            "",
            markdown_table(["hops"] + [str(k) for k in range(1, 9)] + ["all"], [
                [name] + [f"{logic[q][k]:.3f}" for k in list(range(1, 9)) + ["all"]]
                for name, q in (("float32", "none"), ("int8", "int8"))
            ]),
        ]
    else:
        lines += ["", "Logic model: not measured (no --logic-checkpoint given)."]
    write_results("int8_quality", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                   "text": text, "logic": logic}, "\n".join(lines))


if __name__ == "__main__":
    main()
