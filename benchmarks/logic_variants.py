"""Logic accuracy of hydra-tiny variants: which change lets a tiny Hydra chain two lookups?

Each variant trains hydra-tiny on the logic task with one change to the model
config or the training options. The script reports held-out accuracy by hop
count, each problem posed alone from a fresh state. It also counts what the
model predicts on 2-hop problems: the right letter, another chain end (a letter
that never appears on the left of a premise), or something else. A model that recognises
chain ends without chaining lookups gets 2-hop problems right about as often
as one over the number of chain ends. The results file is rewritten after
every run. Usage:

    python benchmarks/logic_variants.py [--variants default,steps-3000,...] [--jobs 2] [--steps 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_results  # noqa: E402

# name -> (what changes, hydra-tiny config overrides, training option overrides)
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "default": ("nothing", {}, {}),
    "steps-3000": ("3x the steps", {}, {"steps": 3000}),
    "d_model-96": ("d_model 64 -> 96", {"d_model": 96}, {}),
    "n_layer-6": ("4 -> 6 blocks (SGA in 3)", {"n_layer": 6}, {}),
    "sga_heads-2": ("4 SGA heads of 16 -> 2 of 32", {"sga_heads": 2}, {}),
    "gates-open": ("SGA and MoE gates start at 0.88, as the SSM's", {"gate_bias_aux": 2.0}, {}),
    "weight_decay-0": ("no weight decay", {}, {"weight_decay": 0.0}),
    "hops-1-3": ("no curriculum, 1-3 hops from the start", {}, {"curriculum": False, "max_hops": 3}),
}
TWO_HOP_PROBLEMS = 300


def answer_kinds(checkpoint: Path, n_distractors: int, seed: int) -> dict[str, int]:
    """Count the model's predictions on fresh 2-hop problems by kind: right, another chain end, other."""
    import torch

    from hydra_edge.train.checkpoint import load_checkpoint
    from hydra_edge.train.logic import EVAL_SEED_OFFSET, LogicTask, make_problem

    model, cfg, _, _ = load_checkpoint(checkpoint)
    model.eval()
    task = LogicTask(cfg.vocab_size, 128, max_hops=2, n_distractors=n_distractors, seed=seed)
    rng = random.Random(seed + EVAL_SEED_OFFSET + 2)
    problems = [make_problem(rng, 2, n_distractors) for _ in range(TWO_HOP_PROBLEMS)]
    ids = torch.tensor([task.problem_ids(p) for p in problems])  # every 2-hop problem has the same length
    with torch.no_grad():
        logits, _ = model(ids)
    predicted = logits[:, ids.shape[1] - 4].argmax(-1).tolist()  # at the query's arrow

    letters = {i: t for t, i in task.vocab.items()}
    kinds = {"right": 0, "another chain end": 0, "other": 0}
    for problem, token in zip(problems, predicted):
        left = {x for x, _ in problem.premises}
        chain_ends = {y for _, y in problem.premises if y not in left}
        letter = letters[token]
        if letter == problem.answer:
            kinds["right"] += 1
        elif letter in chain_ends:
            kinds["another chain end"] += 1
        else:
            kinds["other"] += 1
    return kinds


def train_variant(name: str, args: argparse.Namespace, folder: str) -> dict:
    from hydra_edge.config import get_preset
    from hydra_edge.train.loop import train
    from hydra_edge.train.options import TrainConfig

    _, model_changes, train_changes = VARIANTS[name]
    options = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "seed": args.seed,
               "threads": args.threads, "progress": False, "out": str(Path(folder) / f"{name}.pt")}
    cfg = TrainConfig(task="logic", **{**options, **train_changes})
    result = train(dataclasses.replace(get_preset("hydra-tiny"), **model_changes), cfg)
    return {"variant": name, "steps": cfg.steps, "seconds": result.seconds, "final_loss": result.final_loss,
            "accuracy_by_hops": result.eval["accuracy_by_hops"],
            "two_hop_answers": answer_kinds(Path(cfg.out), cfg.n_distractors, cfg.seed)}


def render(runs: list[dict], args: argparse.Namespace) -> str:
    rows = []
    for run in sorted(runs, key=lambda r: list(VARIANTS).index(r["variant"])):
        by_hops = {int(k): v for k, v in run["accuracy_by_hops"].items()}
        kinds = run["two_hop_answers"]
        rows.append([run["variant"], VARIANTS[run["variant"]][0], run["steps"],
                     *(f"{by_hops[k]:.3f}" if k in by_hops else "" for k in (1, 2, 3)),
                     f"{kinds['right']} / {kinds['another chain end']} / {kinds['other']}",
                     f"{run['final_loss']:.3f}", f"{run['seconds']:.0f}"])
    budget = (f"hydra-tiny on the logic task, batch {args.batch_size}, sequence length {args.seq_len}, "
              f"seed {args.seed}, {args.threads} thread(s) per run; every other option at its default. "
              "Held-out accuracy with each problem posed alone; the answer counts are over "
              f"{TWO_HOP_PROBLEMS} fresh 2-hop problems. Goal: 2-hop accuracy of at least 0.5 within 1,000 steps.")
    return budget + "\n\n" + markdown_table(
        ["variant", "change", "steps", "1-hop", "2-hop", "3-hop",
         "2-hop answers: right / another chain end / other", "final loss", "train s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    parser.add_argument("--steps", type=int, default=1000, help="steps of every variant that does not set its own")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    # keep the runs of the variants not measured this time
    previous = RESULTS / "logic_variants.json"
    runs = [r for r in json.loads(previous.read_text())["runs"] if r["variant"] not in names] \
        if previous.is_file() else []
    with tempfile.TemporaryDirectory() as folder, ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(train_variant, name, args, folder): name for name in names}
        for future in as_completed(futures):
            run = future.result()
            runs.append(run)
            print(f"{run['variant']}: 2-hop accuracy {run['accuracy_by_hops'][2]:.3f} ({run['seconds']:.0f} s)",
                  file=sys.stderr)
            write_results("logic_variants", {"machine": machine(), "args": vars(args), "runs": runs},
                          render(runs, args))


if __name__ == "__main__":
    main()
