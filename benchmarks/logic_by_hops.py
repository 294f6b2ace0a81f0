"""Logic accuracy by hop count: Hydra against the transformer trained with the same budget.

Both models train on the logic task with identical options (steps, batch,
sequence length, optimizer, seed) and are exported to float32 and int8
bundles. The bundles answer the same held-out problems through the runtime,
each problem from a fresh state, as a prompt is answered. Usage:

    python benchmarks/logic_by_hops.py [--hydra hydra-tiny] [--transformer transformer-tiny]
        [--steps 1000] [--lr LR] [--problems 800] [--threads 2] [--name logic_by_hops]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_results  # noqa: E402

MAX_HOPS = 8
EVAL_SEED = 20_261_205  # not a training seed: these problems were never trained on


def train_model(preset: str, args, folder: Path) -> tuple[Path, dict]:
    from hydra_edge.config import get_preset
    from hydra_edge.train.loop import train
    from hydra_edge.train.options import TrainConfig

    out = folder / f"{preset}.pt"
    lr = {} if args.lr is None else {"lr": args.lr}
    cfg = TrainConfig(task="logic", steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      seed=args.seed, threads=args.threads, progress=False, out=str(out), **lr)
    result = train(get_preset(preset), cfg)
    return out, {"seconds": result.seconds, "final_loss": result.final_loss,
                 "pytorch_accuracy_by_hops": result.eval["accuracy_by_hops"]}


def export_bundles(checkpoint: Path, folder: Path) -> dict[str, Path]:
    from hydra_edge.export.bundle import ExportOptions, export_model
    from hydra_edge.export.transformer import export_transformer
    from hydra_edge.train.checkpoint import load_checkpoint

    model, cfg, tokenizer, meta = load_checkpoint(checkpoint)
    exporter = export_transformer if cfg.kind == "transformer" else export_model
    bundles = {}
    for quantize in ("none", "int8"):
        bundles[quantize] = folder / f"{checkpoint.stem}-{quantize}"
        exporter(model, tokenizer.to_str(), bundles[quantize], ExportOptions(quantize=quantize, force=True),
                 task="logic", source=str(checkpoint))
    return bundles


def accuracy_by_hops(bundle: Path, problems: list, threads: int) -> dict:
    from hydra_edge.runtime.transformer_session import open_session
    from hydra_edge.train.logic import LogicTask

    encoder = LogicTask(vocab_size=10**6, seq_len=4096, max_hops=MAX_HOPS, n_distractors=4, seed=0)
    session = open_session(bundle, threads=threads)
    correct = np.zeros(MAX_HOPS + 1)
    total = np.zeros(MAX_HOPS + 1)
    for problem in problems:
        ids = encoder.problem_ids(problem)
        prompt, answer = ids[:-3], ids[-3]  # the prompt ends with the query's "->"
        session.reset()
        correct[problem.hops] += int(session.feed(prompt).argmax() == answer)
        total[problem.hops] += 1
    out = {k: float(correct[k] / total[k]) for k in range(1, MAX_HOPS + 1)}
    out["all"] = float(correct.sum() / total.sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hydra", default="hydra-tiny")
    parser.add_argument("--transformer", default="transformer-tiny")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of both models [default: the "
                        "training default]")
    parser.add_argument("--problems", type=int, default=800, help="held-out problems, spread evenly over 1-8 hops")
    parser.add_argument("--name", default="logic_by_hops", help="results file name under benchmarks/results/")
    args = parser.parse_args()

    from hydra_edge.train.logic import make_problem

    rng = random.Random(EVAL_SEED)
    problems = [make_problem(rng, 1 + i % MAX_HOPS, 4) for i in range(args.problems)]
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in (args.hydra, args.transformer):
            started = time.perf_counter()
            checkpoint, record = train_model(preset, args, Path(tmp))
            bundles = export_bundles(checkpoint, Path(tmp))
            record["bundles"] = {q: accuracy_by_hops(b, problems, args.threads) for q, b in bundles.items()}
            models[preset] = record
            print(f"{preset}: trained and measured in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    hops = list(range(1, MAX_HOPS + 1))
    rows = []
    for preset, record in models.items():
        for quantize, label in (("none", "float32"), ("int8", "int8")):
            accuracy = record["bundles"][quantize]
            rows.append([preset, label] + [f"{accuracy[k]:.3f}" for k in hops] + [f"{accuracy['all']:.3f}"])
    hydra, transformer = models[args.hydra]["bundles"], models[args.transformer]["bundles"]
    verdicts = []
    for quantize, label in (("none", "float32"), ("int8", "int8")):
        behind = [k for k in range(2, 6) if hydra[quantize][k] < transformer[quantize][k]]
        verdicts.append(f"- {label}: Hydra is at least the transformer at every hop count from 2 to 5"
                        if not behind else f"- {label}: Hydra is below the transformer at {len(behind)} of the hop "
                                           f"counts 2 to 5 ({', '.join(map(str, behind))})")
    optimizer = "AdamW with the training defaults" if args.lr is None else f"AdamW with peak learning rate {args.lr:g}"
    table = (f"Budget for both: logic task, {args.steps} steps, batch {args.batch_size}, sequence length "
             f"{args.seq_len}, {optimizer}, seed {args.seed}. {args.problems} held-out problems "
             f"({args.problems // MAX_HOPS} per hop count), each answered from a fresh state by the bundle. "
             "The default learning rate (6e-3) was tuned on hydra-tiny only.\n\n"
             + markdown_table(["model", "bundle"] + [f"{k} hops" for k in hops] + ["all"], rows)
             + "\n\n" + "\n".join(verdicts))
    write_results(args.name, {"machine": machine(), "args": vars(args), "models": models}, table)


if __name__ == "__main__":
    main()
