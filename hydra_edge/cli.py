"""The ``hydra-edge`` command line: a click group whose commands each call one library function.

Every command added with ``@main.command()`` gets the same error handling: a
:class:`~hydra_edge.errors.HydraEdgeError` prints ``error: <message>`` on one
line to stderr and exits with the error's ``exit_code``; ``--verbose`` adds the
traceback. Results go to stdout, logs and progress bars to stderr.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import click

from . import __version__
from .config import ABLATABLE, PRESETS, get_preset
from .errors import HydraEdgeError, UsageError
from .train.options import TASKS, TrainConfig

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
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # a bug of ours: still one line, the traceback under --verbose
            if ctx.params.get("verbose"):
                traceback.print_exc()
            click.echo(f"error: unexpected {type(exc).__name__}: {exc}; rerun with --verbose and report the traceback",
                       err=True)
            ctx.exit(1)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, left: int = 1) -> str:
    """Align ``rows`` under ``headers``: the first ``left`` columns flush left, the others flush right."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def format_bytes(size: int) -> str:
    """Format a byte count in binary units, e.g. 2605248 -> "2.48 MiB"."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


@click.group(cls=HydraEdgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages and print the traceback of errors.")
@click.version_option(__version__, prog_name="hydra-edge")
def main(verbose: bool) -> None:
    """Train, export and run the Hydra language model on CPUs."""
    # under torchrun only rank 0 logs progress; the other ranks report warnings only
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    if verbose:
        level = logging.DEBUG
    # our own stages at INFO; other libraries (onnx, onnxruntime, torch) only when they warn
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("hydra_edge").setLevel(level)


_DEFAULTS = TrainConfig()


@main.command()
@click.option("--preset", default="hydra-tiny", show_default=True, help=f"Model preset: {', '.join(PRESETS)}.")
@click.option("--task", type=click.Choice(list(TASKS)), default=_DEFAULTS.task, show_default=True,
              help="logic: built-in implication chains; text: the file given by --data; recall, domains and facts: "
                   "the probes of SGA, MoE and PKM for ablation studies.")
@click.option("--ablate", type=click.Choice(list(ABLATABLE)), multiple=True,
              help="Switch a Hydra component off, for an ablation study (repeatable). Such a model cannot be exported.")
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
              help="Held-out batches evaluated after training, each as many tokens as --batch-size "
                   "sequences (the logic task poses each problem alone, so more of them fit).")
@click.option("--threads", type=int, default=None,
              help="Torch threads per process  [default: the CPU cores divided by the processes on this machine]")
@click.option("--out", default=_DEFAULTS.out, show_default=True, help="Checkpoint file to write.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr.")
def train(preset: str, task: str, ablate: tuple[str, ...], data: str | None, steps: int, batch_size: int,
          seq_len: int, lr: float, warmup: int, seed: int, eval_batches: int, threads: int | None, out: str,
          progress: bool) -> None:
    """Train a fresh model on a task, evaluate it on held-out data and save a checkpoint.

    Under torchrun (e.g. torchrun --nproc_per_node 2 -m hydra_edge.cli train ...)
    it trains with DistributedDataParallel over gloo.
    """
    # torch is imported only by the commands that need it: the runtime works without it
    from .train.loop import train as run_training

    model_cfg = get_preset(preset)
    if ablate:
        if model_cfg.kind != "hydra":
            raise UsageError(f"--ablate switches off Hydra components; {preset} is a {model_cfg.kind}")
        model_cfg = dataclasses.replace(model_cfg, ablate=ablate)
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
        level = result.eval["curriculum_level"]
        click.echo(f"held-out accuracy by hop count (training curriculum at level {level} of {len(counts)}):")
        click.echo(format_table(["hops", "problems", "accuracy"], rows, left=0))
    elif task != "text":
        click.echo(f"held-out accuracy {result.eval['accuracy']:.3f} on {result.eval['answers']:,} answers")
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
    click.echo(f"{label}: {size:,} bytes ({format_bytes(size)}, float32)")


def _default_bundle_dir(checkpoint: Path, quantize: str, moe: str) -> Path:
    """model.pt -> model-int8/ (or model-f32/, model-int8-pinned/) beside the checkpoint."""
    name = f"{checkpoint.stem}-{'f32' if quantize == 'none' else quantize}"
    return checkpoint.with_name(name + ("-pinned" if moe == "pinned" else ""))


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Bundle folder to write  [default: beside the checkpoint, e.g. model-int8/]")
@click.option("--quantize", type=click.Choice(["int8", "none"]), default="int8", show_default=True,
              help="int8 weights (per channel or per row), or float32 throughout.")
@click.option("--moe", type=click.Choice(["gather", "pinned"]), default="gather", show_default=True,
              help="gather: route per chunk among all experts; pinned: keep only the experts --calib text uses.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text used by --moe pinned to choose experts and measure the quality change.")
@click.option("--pin-mass", type=float, default=None,
              help="With --moe pinned, keep per block the experts carrying this share of the routing mass  "
                   "[default: 0.9]")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset of the graphs (18 to 21).")
@click.option("--force", is_flag=True, help="Replace an existing bundle folder (only after the new one verified).")
def export(checkpoint: Path, out: Path | None, quantize: str, moe: str, calib: Path | None, pin_mass: float | None,
           opset: int, force: bool) -> None:
    """Export a checkpoint to a bundle that onnxruntime runs without torch.

    Stages: trace, lower (ONNX), quantize, verify (onnxruntime against the
    PyTorch step API), write. A failed export leaves no bundle behind.
    """
    from .export.bundle import ExportOptions, export_model
    from .train.checkpoint import load_checkpoint

    if pin_mass is not None and moe != "pinned":
        raise UsageError("--pin-mass is only read by --moe pinned; add --moe pinned or drop --pin-mass")
    pinning = {} if pin_mass is None else {"pin_mass": pin_mass}
    options = ExportOptions(quantize=quantize, moe=moe, calib=calib, opset=opset, force=force, **pinning)
    model, cfg, tokenizer, meta = load_checkpoint(checkpoint)
    out = out or _default_bundle_dir(checkpoint, quantize, moe)
    if cfg.kind == "transformer":
        # the baseline: one decoder graph with a growing key/value cache, same quantization and runtime
        from .export.transformer import export_transformer

        exporter = export_transformer
    else:
        exporter = export_model
    result = exporter(model, tokenizer.to_str(), out, options, task=meta.get("task", "unknown"),
                      source=str(checkpoint))

    click.echo(format_table(["stage", "seconds"], [(k, f"{v:.1f}") for k, v in result.stage_seconds.items()]))
    click.echo("")
    click.echo("verification against PyTorch:")
    rows = [(c.name, f"{c.value:.3g}", f"{c.limit:.3g}", "ok" if c.ok else "FAIL") for c in result.verify.checks]
    if quantize == "none" and len(rows) > 4:
        worst = max(result.verify.checks[1:], key=lambda c: c.value)
        rows = rows[:1] + [(f"worst state ({worst.name.split()[0]})", f"{worst.value:.3g}", f"{worst.limit:.3g}", "ok")]
    click.echo(format_table(["check", "value", "limit", ""], rows))
    if result.pinned is not None:
        pinned = result.pinned
        click.echo("")
        click.echo(f"pinned experts (rule: largest routing mass up to {pin_mass:.0%} per block, at least top_k):")
        click.echo(format_table(["block", "kept experts"], [(k, " ".join(map(str, v))) for k, v in pinned.kept.items()]))
        click.echo(f"calibration text {calib}: {pinned.calib_tokens:,} tokens, loss {pinned.loss_before:.4f} -> "
                   f"{pinned.loss_after:.4f} nats/token, perplexity {pinned.perplexity_change:+.2%}")
    click.echo("")
    click.echo(f"wrote {result.bundle} ({result.bytes_total / 1e6:.1f} MB)")


def _open_session(bundle: Path, threads: int, skip_hash_check: bool):
    """Open a HydraSession or a TransformerSession, whichever the bundle's model kind needs."""
    from .runtime.transformer_session import open_session

    return open_session(bundle, threads=threads, check_hashes=not skip_hash_check)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Text to continue; prints the generated text as it is produced.")
@click.option("--file", "file_", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text file to stream through the model; reports loss, perplexity, speed and memory.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=64, show_default=True,
              help="Tokens to generate after --prompt.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 picks the most likely token.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample among the k most likely tokens (0: all).")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="Sample among the most likely tokens whose probability adds up to p.")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of the sampler, for repeatable output.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime intra-op threads.")
@click.option("--save-state", type=click.Path(path_type=Path), default=None,
              help="After the run, save the stream's state to this file.")
@click.option("--resume-state", type=click.Path(path_type=Path), default=None,
              help="Continue the stream saved in this file instead of starting at position 0.")
@click.option("--skip-hash-check", is_flag=True,
              help="Do not compute the files' sha256 at load (presence and sizes are still checked).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar with --file.")
def run(bundle: Path, prompt: str | None, file_: Path | None, max_new_tokens: int, temperature: float, top_k: int,
        top_p: float, seed: int | None, threads: int, save_state: Path | None, resume_state: Path | None,
        skip_hash_check: bool, progress: bool) -> None:
    """Run a bundle: continue a --prompt, or stream a --file and report perplexity.

    For a bundle of the logic task, --prompt "A->B.B->C.A->" prints the answer.
    An empty or blank --prompt is a usage error.
    """
    from .runtime.sampling import SamplingOptions

    if (prompt is None) == (file_ is None):
        raise UsageError("give exactly one of --prompt TEXT or --file PATH")
    sampling = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty; give some text to continue")
    if file_ is not None and not file_.is_file():
        raise UsageError(f"--file {file_} is {'a folder' if file_.is_dir() else 'not found'}; give a UTF-8 text file")
    if save_state is not None and save_state.is_dir():
        raise UsageError(f"--save-state {save_state} is a folder; give a file path")
    if save_state is not None and not save_state.absolute().parent.is_dir():
        raise UsageError(f"folder {save_state.absolute().parent} of --save-state does not exist; create it first")
    session = _open_session(bundle, threads, skip_hash_check)
    from .runtime.text import load_tokenizer

    tokenizer = load_tokenizer(bundle, session.manifest)
    if resume_state is not None:
        session.load_state(resume_state)
    if prompt is not None:
        _generate(session, tokenizer, prompt, max_new_tokens, sampling)
    else:
        _stream(session, tokenizer, file_, progress)
    if save_state is not None:
        session.save_state(save_state)
        click.echo(f"saved the state at position {session.pos:,} to {save_state}", err=True)


def _generate(session, tokenizer, prompt: str, max_new_tokens: int, sampling) -> None:
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise UsageError("--prompt encodes to no tokens; give some text to continue")
    vocab_limit = tokenizer.get_vocab_size(with_added_tokens=True)
    if session.manifest.get("task") == "logic":
        # the answer of an implication query is one token
        answer = next(session.generate(ids, max_new_tokens=1, sampling=sampling, vocab_limit=vocab_limit))
        click.echo(tokenizer.decode([answer]))
        return
    stop = tuple(i for i in (tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<eos>")) if i is not None)
    generated: list[int] = []
    shown = ""
    click.echo(prompt, nl=False)
    for token in session.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop,
                                  vocab_limit=vocab_limit):
        generated.append(token)
        # decode the whole continuation each time: one token may be part of a multi-byte character
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):
            click.echo(text[len(shown):], nl=False)
            shown = text
    click.echo("")


def _stream(session, tokenizer, path: Path, progress: bool) -> None:
    from tqdm import tqdm

    from .runtime.text import iter_text_blocks, stream_file

    # an empty or binary file fails on its first block, before the progress bar is drawn
    next(iter_text_blocks(path))
    with tqdm(total=path.stat().st_size if path.is_file() else 0, unit="B", unit_scale=True,
              disable=not progress, file=sys.stderr, desc="streaming") as bar:
        report = stream_file(session, tokenizer, path, on_progress=lambda done, total: bar.update(done - bar.n))
    rows = [
        ("tokens", f"{report.tokens:,}"),
        ("loss", f"{report.loss:.4f} nats/token"),
        ("perplexity", f"{report.perplexity:.2f}"),
        ("prefill speed", f"{report.tokens_per_second:,.0f} tokens/s"),
        ("peak RSS", f"{report.peak_rss_bytes / 2**20:.1f} MiB"),
        ("private memory (USS) at end", f"{report.uss_bytes / 2**20:.1f} MiB"),
        ("position", f"{session.pos:,}"),
    ]
    click.echo(format_table(["measure", "value"], rows))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="A second bundle, e.g. the transformer baseline, measured at the same lengths in the same run.")
@click.option("--lengths", default="1k,8k,64k", show_default=True,
              help="Context lengths in tokens, comma-separated; 1k = 1024 tokens.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime intra-op threads, the same for every bundle.")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens decoded one at a time after each prefill.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs per bundle and length; tables show the mean and half the range.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds a prefill may take; a slower one stops and is reported as a timeout. Decode has the "
                   "same limit.")
@click.option("--memory-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="MiB of resident memory a measurement may use before it is stopped  [default: half the "
                   "physical memory]")
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text file whose tokens are fed instead of random token ids.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Write every measurement, the settings and the machine to this JSON file.")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Write a PNG of throughput and memory against context length (needs hydra-edge[plot]).")
def profile(bundle: Path, baseline: Path | None, lengths: str, threads: int, decode_tokens: int, repeats: int,
            time_limit: float, memory_limit: float | None, text: Path | None, json_out: Path | None,
            plot: Path | None) -> None:
    """Measure prefill and decode throughput and memory of a bundle over context lengths.

    Each length runs in a fresh process: prefill of that many tokens from an
    empty state, then --decode-tokens greedy tokens at that context, peak
    resident memory (RSS) and private memory (USS). With --baseline, both
    bundles alternate at every length and the table adds their ratios.
    """
    from .profile import default_memory_limit_mib, parse_lengths, profile_bundles, profile_document, ratio_rows
    from .profile import table_rows, write_json
    from .profile.plot import check_plot_available, plot_profiles

    # check every argument before the first measurement, which may take minutes
    token_counts = parse_lengths(lengths)
    for path in (json_out, plot):
        if path is not None and not path.absolute().parent.is_dir():
            raise UsageError(f"folder {path.absolute().parent} does not exist; create it or choose another path")
        if path is not None and path.is_dir():
            raise UsageError(f"{path} is a folder; pass a file name for the output")
    if plot is not None:
        check_plot_available(plot)
    memory_limit = memory_limit or default_memory_limit_mib()
    bundles = [bundle] + ([baseline] if baseline is not None else [])

    profiles = profile_bundles(bundles, token_counts, threads=threads, decode_tokens=decode_tokens, repeats=repeats,
                               time_limit_s=time_limit, memory_limit_mib=memory_limit, text=text)

    headers, rows, notes = table_rows(profiles)
    click.echo(format_table(headers, rows, left=2))
    for note in notes:
        click.echo(note)
    if baseline is not None:
        click.echo("")
        click.echo(f"{profiles[0].label} relative to {profiles[1].label} (tokens/s ratio):")
        click.echo(format_table(*ratio_rows(profiles), left=1))
    settings = {"lengths": token_counts, "threads": threads, "decode_tokens": decode_tokens, "repeats": repeats,
                "time_limit_s": time_limit, "memory_limit_mib": memory_limit,
                "tokens": str(text) if text is not None else "random token ids, seed 0"}
    if json_out is not None:
        write_json(json_out, profile_document(profiles, settings))
        click.echo(f"wrote {json_out}")
    if plot is not None:
        plot_profiles(profiles, plot, title=f"{threads} thread(s); tokens: {settings['tokens']}")
        click.echo(f"wrote {plot}")

    # a profile that measured nothing for a bundle is a failure, not a result
    for measured in profiles:
        if not any(r.prefill_tps is not None or r.decode_tps is not None for r in measured.results):
            raise HydraEdgeError(f"no length of {measured.label} could be measured; the notes above say why")


if __name__ == "__main__":
    main(prog_name="hydra-edge")
