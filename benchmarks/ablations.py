"""Ablations: each of SGA, MoE, workspace and PKM switched off in turn, on its own probe task.

For every pair (component, probe) the script trains the complete model and
the model with that component switched off under the same budget (preset,
steps, batch, sequence length, optimizer, seed), and compares held-out
accuracy. The results file is rewritten after every run, so an interrupted
run keeps what it measured. Usage:

    python benchmarks/ablations.py [--preset hydra-tiny] [--steps 500] [--logic-steps 1000] [--threads 1]
        [--components sga,moe,workspace,pkm]

With --components, only those pairs are trained again; the runs of the other
pairs are kept from the results file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_results  # noqa: E402

# component -> the probe task that needs it
PROBES = {
    "sga": ("recall", "long-range recall: key/value pairs, then every key asked again"),
    "moe": ("domains", "mixed domains: one of 32 fixed letter maps per sequence"),
    "workspace": ("logic", "multi-step logic: implication chains of 1 to 8 hops"),
    "pkm": ("facts", "fact recall: 8,192 fixed three-letter keys and their values"),
}


def train_once(preset: str, task: str, ablate: tuple[str, ...], steps: int, args, folder: Path) -> dict:
    from hydra_edge.config import get_preset
    from hydra_edge.train.loop import train
    from hydra_edge.train.options import TrainConfig

    model_cfg = dataclasses.replace(get_preset(preset), ablate=ablate)
    cfg = TrainConfig(task=task, steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                      threads=args.threads, eval_batches=args.eval_batches, progress=False,
                      out=str(folder / f"{task}-{'-'.join(ablate) or 'full'}.pt"))
    result = train(model_cfg, cfg)
    run = {"task": task, "ablate": list(ablate), "steps": steps, "seconds": result.seconds,
           "final_loss": result.final_loss, "accuracy": result.eval["accuracy"]}
    if task == "logic":
        run["accuracy_by_hops"] = result.eval["accuracy_by_hops"]
    return run


def render(runs: list[dict], args) -> str:
    rows = []
    for component, (task, description) in PROBES.items():
        full = next((r for r in runs if r["task"] == task and not r["ablate"]), None)
        off = next((r for r in runs if r["task"] == task and r["ablate"] == [component]), None)

        def cell(run, key="accuracy"):
            if run is None:
                return "not run"
            value = run[key] if key == "accuracy" else run["accuracy_by_hops"][2]
            return f"{value:.3f}"

        change = f"{off['accuracy'] - full['accuracy']:+.3f}" if full and off else ""
        rows.append([component, f"{task}: {description}", cell(full), cell(off), change])
        if task == "logic" and full and off:
            rows.append(["", "logic, 2-hop chains only", cell(full, "hops2"), cell(off, "hops2"),
                         f"{off['accuracy_by_hops'][2] - full['accuracy_by_hops'][2]:+.3f}"])
    budget = (f"Preset {args.preset}; each pair trained with the same budget: {args.steps} steps "
              f"({args.logic_steps} for logic), batch {args.batch_size}, sequence length {args.seq_len}, "
              f"AdamW with the training defaults, seed {args.seed}, {args.threads} thread(s). Held-out accuracy on "
              "answer tokens; the logic row is over all hop counts 1 to 8.")
    return budget + "\n\n" + markdown_table(
        ["switched off", "probe task", "complete model", "without it", "change"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="hydra-tiny")
    parser.add_argument("--steps", type=int, default=500, help="steps of the recall, domains and facts runs")
    parser.add_argument("--logic-steps", type=int, default=1000, help="steps of the logic runs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--components", default=",".join(PROBES), help="comma-separated components to measure")
    args = parser.parse_args()
    components = args.components.split(",")
    unknown = set(components) - set(PROBES)
    if unknown:
        parser.error(f"unknown components {sorted(unknown)}; choose from {', '.join(PROBES)}")

    # keep the runs of the pairs not measured this time
    previous = RESULTS / "ablations.json"
    tasks = {PROBES[c][0] for c in components}
    runs = [r for r in json.loads(previous.read_text())["runs"] if r["task"] not in tasks] if previous.is_file() else []
    with tempfile.TemporaryDirectory() as tmp:
        for component in components:
            task = PROBES[component][0]
            steps = args.logic_steps if task == "logic" else args.steps
            for ablate in ((), (component,)):
                started = time.perf_counter()
                runs.append(train_once(args.preset, task, ablate, steps, args, Path(tmp)))
                print(f"{task} {'without ' + component if ablate else 'complete'}: accuracy "
                      f"{runs[-1]['accuracy']:.3f} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
                write_results("ablations", {"machine": machine(), "args": vars(args), "runs": runs},
                              render(runs, args))


if __name__ == "__main__":
    main()
