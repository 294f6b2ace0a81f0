"""Export of the transformer baseline to a bundle that the same runtime runs.

The bundle contains one graph, ``decoder.onnx``, in the usual decoder-with-past
form. Its inputs are ``tokens`` (1, T), ``pos`` and, per layer,
``layer{i}.k_cache`` and ``layer{i}.v_cache`` (1, H, S, P) for the S earlier
positions. Its outputs are ``logits`` (1, T, V) and ``new.layer{i}.k_cache``
etc. of length S + T. Both T (at least 1, no upper bound) and S (0 at the
start of a stream) are dynamic axes, so a single graph serves prefill and
decode.

Quantization, the manifest's checksums and the temporary-folder-then-rename
write are the same as for a Hydra bundle (see :mod:`hydra_edge.export.bundle`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .. import __version__
from ..config import config_to_dict
from ..errors import UsageError
from ..model.transformer import Transformer
from ..quantize import QuantizationReport, quantize_graph
from ..runtime.manifest import BUNDLE_FORMAT, FORMAT_VERSION
from ..runtime.transformer_session import TransformerSession
from .bundle import (
    ExportOptions,
    ExportResult,
    _check_graph,
    _prepare_destination,
    _stage,
    _tensor_entries,
    bundle_folder,
    finish_bundle,
)
from .graphs import NEW_PREFIX, program_to_onnx
from .verify import FLOAT_TOLERANCE, Check, VerifyReport, int8_checks

log = logging.getLogger(__name__)

GRAPH_NAME = "decoder"
# torch.export needs finite bounds for a dynamic axis; this one is far beyond any context we run
MAX_DYNAMIC_LENGTH = 1 << 24


class DecoderGraph(nn.Module):
    """``Transformer.step`` with the cache passed as a list, the form torch.export traces."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.names = model.state_names()

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, states: list[torch.Tensor]):
        state = dict(zip(self.names, states))
        state["pos"] = pos
        logits, new = self.model.step(tokens, state)
        return (logits, *(new[n] for n in self.names))


def decoder_io_names(model: Transformer) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder graph."""
    names = model.state_names()
    return ["tokens", "pos", *names], ["logits", *(NEW_PREFIX + n for n in names)]


def trace_decoder(model: Transformer) -> torch.export.ExportedProgram:
    """Trace ``model.step`` with torch.export, the new length T and the cache length S dynamic."""
    cfg = model.cfg
    names = model.state_names()
    # example lengths that are neither 0 nor 1, so that no special case is frozen into the graph
    t, s = 5, 3
    tokens = torch.zeros(1, t, dtype=torch.long)
    caches = [torch.zeros(1, cfg.n_head, s, cfg.head_dim) for _ in names]
    seq = torch.export.Dim("T", min=1, max=MAX_DYNAMIC_LENGTH)
    past = torch.export.Dim("S", min=0, max=MAX_DYNAMIC_LENGTH)
    dynamic_shapes = {"tokens": {1: seq}, "pos": None, "states": [{2: past}] * len(names)}
    args = (tokens, torch.tensor(s, dtype=torch.long), caches)
    return torch.export.export(DecoderGraph(model).eval(), args, dynamic_shapes=dynamic_shapes, strict=False)


def lower_decoder(program: torch.export.ExportedProgram, model: Transformer, opset: int) -> onnx.ModelProto:
    """Convert the traced decoder to ONNX with the manifest's names for inputs, outputs and axes."""
    input_names, output_names = decoder_io_names(model)
    proto = program_to_onnx(program, model, input_names, output_names, opset)

    # torch names each cache's axis after its own symbol; every cache has the same length S
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name == "tokens":
            dims[1].dim_param = "T"
        elif value.name != "pos":
            dims[2].dim_param = "S"
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        if value.name == "logits":
            dims[1].dim_param = "T"
        else:
            dims[2].dim_param = "S + T"
    return proto


def export_transformer(
    model: Transformer,
    tokenizer_json: str,
    out: Path,
    options: ExportOptions,
    *,
    task: str = "unknown",
    source: str = "",
) -> ExportResult:
    """Export the transformer baseline to the bundle folder ``out``.

    Raise UsageError for Hydra-only options and ExportError if the bundle
    fails verification against ``model.step``. Like ``export_model``, nothing
    is written at ``out`` unless every stage passed.
    """
    if options.moe != "gather":
        raise UsageError(f"--moe {options.moe} applies to Hydra's experts; a transformer has none, so leave --moe at its default")
    out = Path(out).absolute()
    _prepare_destination(out, options.force)
    timings: dict[str, float] = {}
    model = model.eval()

    with bundle_folder(out) as tmp:
        # 1. trace the step API with torch.export, then lower it to ONNX
        with _stage("trace", timings):
            program = trace_decoder(model)
        # the ONNX exporter prints its progress to stdout; our stages are logged instead
        with _stage("lower", timings), contextlib.redirect_stdout(io.StringIO()):
            proto = lower_decoder(program, model, options.opset)
        _check_graph(proto, GRAPH_NAME)

        # 2. quantize: the same pass as Hydra's graphs (the embedding by row, matrix multiplies by channel)
        report = QuantizationReport()
        with _stage("quantize", timings):
            if options.quantize == "int8":
                proto, report = quantize_graph(proto)
                _check_graph(proto, GRAPH_NAME)

        # 3. the graph, the tokenizer, then the manifest
        onnx.save(proto, tmp / f"{GRAPH_NAME}.onnx")
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        manifest = _manifest(model, proto, options, report, task=task, source=source)

        # 4. verify against the PyTorch step API, then move into place
        verify, total = finish_bundle(tmp, out, manifest, timings, lambda: verify_transformer_bundle(
            model, tmp, quantized=options.quantize == "int8", n_tokens=options.verify_tokens))
    return ExportResult(bundle=out, bytes_total=total, stage_seconds=timings, verify=verify, quantization=report)


def _manifest(model: Transformer, proto: onnx.ModelProto, options: ExportOptions, report: QuantizationReport,
              *, task: str, source: str) -> dict:
    """Build the manifest without its ``files`` section; cache shapes carry ``"S"`` for the past length."""
    cfg = model.cfg
    names = model.state_names()
    inputs, outputs = decoder_io_names(model)
    return {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "hydra_edge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "task": task,
        "model": config_to_dict(cfg),
        "position": {"name": "pos", "shape": [], "dtype": "int64"},
        "state": [
            {"name": n, "shape": [1, cfg.n_head, "S", cfg.head_dim], "dtype": "float32", "graph": GRAPH_NAME}
            for n in names
        ],
        "graphs": {
            GRAPH_NAME: {
                "file": f"{GRAPH_NAME}.onnx",
                "state": names,
                "inputs": _tensor_entries(proto, inputs, "input"),
                "outputs": _tensor_entries(proto, outputs, "output"),
            }
        },
        "quantization": {"mode": options.quantize, **asdict(report)},
        "tokenizer": {"file": "tokenizer.json"},
    }


# -- verification --------------------------------------------------------------


def transformer_call_lengths(chunk: int, n_tokens: int) -> list[int]:
    """Call lengths of 1, 2, a prime, ``chunk - 1``, ``chunk`` and longer than ``chunk``, adding up to ``n_tokens``."""
    pattern = [1, 2, 7, max(chunk - 1, 1), 1, chunk, 3 * chunk + 5, 13]
    lengths, total = [], 0
    while total < n_tokens:
        for n in pattern:
            n = min(n, n_tokens - total)
            if n < 1:
                break
            lengths.append(n)
            total += n
    return lengths


def verify_transformer_bundle(model: Transformer, bundle: Path, *, quantized: bool, n_tokens: int = 320,
                              seed: int = 0) -> VerifyReport:
    """Compare the bundle with ``model.step`` on random tokens in two streams.

    One stream starts from an empty cache at position 0; the other from the
    cache PyTorch built over ``chunk + 3`` earlier tokens. float32 bundles
    must match logits and every cache within FLOAT_TOLERANCE; int8 bundles
    are checked by relative logit RMS error and top-1 agreement, as Hydra's.
    """
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    session = TransformerSession(bundle, threads=1, check_hashes=True)
    report = VerifyReport()
    got, want = [], []
    worst_cache: dict[str, float] = {}

    start = model.init_state(1)
    warm = torch.from_numpy(rng.integers(0, cfg.vocab_size, cfg.chunk + 3))[None]
    with torch.no_grad():
        _, later = model.step(warm, start)
    for begin, budget in ((start, n_tokens), (later, max(n_tokens // 2, 1))):
        state = begin
        session.pos = int(begin["pos"])
        session.state = {n: begin[n].numpy().copy() for n in session.state}
        for n in transformer_call_lengths(cfg.chunk, budget):
            tokens = rng.integers(0, cfg.vocab_size, n).astype(np.int64)
            with torch.no_grad():
                ref, state = model.step(torch.from_numpy(tokens)[None], state)
            got.append(session.step(tokens))
            want.append(ref[0].numpy())
            for name, value in session.state.items():
                diff = float(np.abs(value - state[name].numpy()).max())
                worst_cache[name] = max(worst_cache.get(name, 0.0), diff)
            report.tokens += n

    got_all, want_all = np.concatenate(got), np.concatenate(want)
    if quantized:
        report.checks += int8_checks(got_all, want_all)
    else:
        report.checks.append(Check("logits max abs diff", float(np.abs(got_all - want_all).max()), FLOAT_TOLERANCE))
        for name, diff in worst_cache.items():
            report.checks.append(Check(f"{name} max abs diff", diff, FLOAT_TOLERANCE))
    return report
