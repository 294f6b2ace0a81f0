"""The ``hydra-edge`` command line: a click group whose commands each call one library function.

Every command added with ``@main.command()`` gets the same error handling: a
:class:`~hydra_edge.errors.HydraEdgeError` prints ``error: <message>`` on one
line to stderr and exits with the error's ``exit_code``; ``--verbose`` adds the
traceback. Results go to stdout, logs and progress bars to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence

import click

from . import __version__
from .config import PRESETS, get_preset
from .errors import HydraEdgeError
from .train.options import TrainConfig

log = logging.getLogger(__name__)


class HydraEdgeGroup(click.Group):
    """A click group that reports a HydraEdgeError from any of its commands as one line on stderr."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HydraEdgeError as exc:
            if ctx.params.get("verbose"):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, left: int = 1) -> str:
    """Align ``rows`` under ``headers``: the first ``left`` columns flush left, the others flush right."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


@click.group(cls=HydraEdgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages and print the traceback of errors.")
@click.version_option(__version__, prog_name="hydra-edge")
def main(verbose: bool) -> None:
    """Train, export and run the Hydra language model on CPUs."""
    # under torchrun only rank 0 logs progress; the other ranks report warnings only
    is_main_rank = os.environ.get("RANK", "0") == "0"
    level = logging.DEBUG if verbose else logging.INFO if is_main_rank else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


_DEFAULTS = TrainConfig()


@main.command()
@click.option("--preset", default="hydra-tiny", show_default=True, help=f"Model preset: {', '.join(PRESETS)}.")
@click.option("--task", type=click.Choice(["logic", "text"]), default=_DEFAULTS.task, show_default=True,
              help="logic: built-in implication chains; text: the file given by --data.")
@click.option("--data", default=None, help="UTF-8 text file for --task text; its last 10% is held out.")
@click.option("--steps", type=int, default=_DEFAULTS.steps, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True,
              help="Sequences per step and process.")
@click.option("--seq-len", type=int, default=_DEFAULTS.seq_len, show_default=True, help="Tokens per sequence.")
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True,
              help="Peak learning rate after warm-up; cosine decay follows.")
@click.option("--warmup", type=int, default=_DEFAULTS.warmup, show_default=True, help="Linear warm-up steps.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
              help="Seed of the initial weights and the training data.")
@click.option("--eval-batches", type=int, default=_DEFAULTS.eval_batches, show_default=True,
              help="Held-out batches (of --batch-size sequences) evaluated after training.")
@click.option("--threads", type=int, default=None,
              help="Torch threads per process  [default: the CPU cores divided by the processes on this machine]")
@click.option("--out", default=_DEFAULTS.out, show_default=True, help="Checkpoint file to write.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr.")
def train(preset: str, task: str, data: str | None, steps: int, batch_size: int, seq_len: int, lr: float,
          warmup: int, seed: int, eval_batches: int, threads: int | None, out: str, progress: bool) -> None:
    """Train a fresh model on a task, evaluate it on held-out data and save a checkpoint.

    Under torchrun (e.g. torchrun --nproc_per_node 2 -m hydra_edge.cli train ...)
    it trains with DistributedDataParallel over gloo.
    """
    # torch is imported only by the commands that need it: the runtime works without it
    from .train.loop import train as run_training

    model_cfg = get_preset(preset)
    cfg = TrainConfig(task=task, data=data, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                      warmup=warmup, seed=seed, eval_batches=eval_batches, threads=threads, out=out,
                      progress=progress)
    result = run_training(model_cfg, cfg)
    if result.checkpoint is None:  # ranks other than 0 under torchrun
        return

    if task == "logic":
        by_hops = result.eval["accuracy_by_hops"]
        counts = result.eval["problems_by_hops"]
        rows = [(k, counts[k], f"{by_hops[k]:.3f}") for k in by_hops]
        rows.append(("all", sum(counts.values()), f"{result.eval['accuracy']:.3f}"))
        click.echo("held-out accuracy by hop count:")
        click.echo(format_table(["hops", "problems", "accuracy"], rows, left=0))
    else:
        click.echo(f"held-out loss {result.eval['loss']:.4f} nats/token, perplexity "
                   f"{result.eval['perplexity']:.2f} ({result.eval['tokens']:,} tokens of the last 10% of {data})")
    click.echo(f"saved {result.checkpoint}: {result.steps} steps in {result.seconds:.1f} s on "
               f"{result.world_size} process(es), final training loss {result.final_loss:.4f}, "
               f"{result.tokens_per_second:,.0f} tokens/s")


@main.command()
@click.argument("checkpoint")
def info(checkpoint: str) -> None:
    """Print the parameter count per component and the state size of a checkpoint's model."""
    from .train.checkpoint import load_checkpoint
    from .train.summary import count_by_component, state_size

    model, cfg, tokenizer, meta = load_checkpoint(checkpoint)
    counts = count_by_component(model, cfg)
    total = sum(c.parameters for c in counts)

    click.echo(f"checkpoint {checkpoint}: {cfg.name} ({cfg.kind}), vocab_size {cfg.vocab_size}, "
               f"d_model {cfg.d_model}, n_layer {cfg.n_layer}")
    click.echo(f"trained on the {meta['task']} task for {meta['train'].get('steps', '?')} steps; "
               f"tokenizer with {tokenizer.get_vocab_size()} tokens")
    click.echo("")
    rows = [(c.component, c.modules, f"{c.parameters:,}", f"{100 * c.parameters / total:.1f}%") for c in counts]
    rows.append(("total", "", f"{total:,}", "100.0%"))
    click.echo(format_table(["component", "modules", "parameters", "share"], rows))
    click.echo("")
    label, size = state_size(cfg)
    click.echo(f"{label}: {size:,} bytes ({size / 1024:.1f} KiB, float32)")


if __name__ == "__main__":
    main(prog_name="hydra-edge")
