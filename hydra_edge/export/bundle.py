"""The export pipeline: trace, lower, quantize, verify, write.

A bundle is built in a temporary folder beside its destination and renamed
into place only after verification passed. A failed or interrupted export
therefore leaves no partial bundle, and an existing bundle is replaced (with
``force``) only at the very end.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import onnx

from .. import __version__
from ..config import config_to_dict
from ..errors import ExportError, UsageError
from ..model.hydra import Hydra
from ..quantize import QuantizationReport, quantize_graph, quantize_rows
from ..runtime.manifest import BUNDLE_FORMAT, FORMAT_VERSION, MANIFEST_NAME, sha256_file
from .graphs import graph_io_names, lower_graph, trace_graph
from .pinned import PinResult, pin_experts
from .verify import VerifyReport, verify_bundle

log = logging.getLogger(__name__)

SUPPORTED_OPSETS = range(18, 22)


@dataclass(frozen=True)
class ExportOptions:
    """Options of ``hydra-edge export``."""

    quantize: Literal["int8", "none"] = "int8"
    moe: Literal["gather", "pinned"] = "gather"
    calib: Path | None = None  # calibration text of --moe pinned
    pin_mass: float = 0.9  # pinned mode keeps, per MoE block, the experts carrying this share of routing mass
    opset: int = 18
    force: bool = False
    verify_tokens: int = 320

    def __post_init__(self) -> None:
        if self.quantize not in ("int8", "none"):
            raise UsageError(f"--quantize must be 'int8' or 'none', got {self.quantize!r}")
        if self.moe not in ("gather", "pinned"):
            raise UsageError(f"--moe must be 'gather' or 'pinned', got {self.moe!r}")
        if self.moe == "pinned" and self.calib is None:
            raise UsageError("--moe pinned needs --calib TEXT_FILE to measure which experts the text uses")
        if self.moe != "pinned" and self.calib is not None:
            raise UsageError("--calib is only read by --moe pinned; add --moe pinned or drop --calib")
        if self.opset not in SUPPORTED_OPSETS:
            raise UsageError(f"--opset must be between {SUPPORTED_OPSETS.start} and {SUPPORTED_OPSETS.stop - 1}, got {self.opset}")
        if not 0.0 < self.pin_mass <= 1.0:
            raise UsageError(f"--pin-mass must be in (0, 1], got {self.pin_mass}")
        if self.verify_tokens < 1:
            raise UsageError(f"verify tokens must be at least 1, got {self.verify_tokens}")


@dataclass
class ExportResult:
    bundle: Path
    bytes_total: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    verify: VerifyReport | None = None
    pinned: PinResult | None = None
    quantization: QuantizationReport | None = None


@contextlib.contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    _stop_if_interrupted()
    log.info("%s ...", name)
    start = time.perf_counter()
    yield
    _stop_if_interrupted()
    timings[name] = time.perf_counter() - start
    log.info("%s done in %.1f s", name, timings[name])


def _write_array(path: Path, array: np.ndarray) -> dict:
    """Write a raw little-endian array file; return its manifest entry."""
    array = np.ascontiguousarray(array)
    array.astype(array.dtype.newbyteorder("<"), copy=False).tofile(path)
    return {"file": path.name, "shape": list(array.shape), "dtype": str(array.dtype)}


def _tensor_entries(proto: onnx.ModelProto, names: list[str], kind: str) -> list[dict]:
    """Name, shape (``"T"`` for the chunk axis) and dtype of graph inputs or outputs."""
    values = {v.name: v for v in (proto.graph.input if kind == "input" else proto.graph.output)}
    entries = []
    for name in names:
        tt = values[name].type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        entries.append({"name": name, "shape": shape, "dtype": dtype})
    return entries


def _check_graph(proto: onnx.ModelProto, part: str) -> None:
    """Full ONNX check, and no operator outside the standard domain or any control flow."""
    onnx.checker.check_model(proto, full_check=True)
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise ExportError(f"{part} graph has node {node.name} of domain {node.domain!r}; only standard ONNX operators are allowed")
        if node.op_type in ("If", "Loop", "Scan"):
            raise ExportError(f"{part} graph has a {node.op_type} node ({node.name}); routing must not use control flow")


def _prepare_destination(out: Path, force: bool) -> None:
    # --force replaces bundle folders only, never a file
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; choose another --out")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it or choose another --out")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"folder {parent} of --out does not exist; create it or choose another --out")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}; choose another --out")


@contextlib.contextmanager
def bundle_folder(out: Path) -> Iterator[Path]:
    """Yield the temporary folder a bundle is built in. The folder is removed if the block fails or is interrupted."""
    tmp = make_temp_folder(out)
    _received_signals.clear()
    previous = {sig: signal.signal(sig, _on_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write the bundle in {out.parent}: {exc.strerror or exc}; "
                          "free some space or choose another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def finish_bundle(tmp: Path, out: Path, manifest: dict, timings: dict[str, float],
                  verify: Callable[[], VerifyReport]) -> tuple[VerifyReport, int]:
    """Write the manifest last, run ``verify`` on the folder and move it to ``out``.

    Returns the verification report and the bundle's size in bytes.
    """
    files = {path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)} for path in sorted(tmp.iterdir())}
    manifest["files"] = files
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1), encoding="utf-8")

    with _stage("verify", timings):
        report = verify()
    if not report.passed:
        raise ExportError(f"verification failed, no bundle written: {report.summary()}")

    with _stage("write", timings):
        _move_into_place(tmp, out)
    return report, sum(entry["bytes"] for entry in files.values()) + (out / MANIFEST_NAME).stat().st_size


def make_temp_folder(out: Path) -> Path:
    """Create the folder a bundle is built in, beside ``out``; its name carries our pid for later cleanup."""
    _remove_stale_temp_folders(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write the bundle in {out.parent}: {exc.strerror or exc}; "
                          "free some space or choose another --out") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; a bundle is an ordinary folder
    return tmp


_received_signals: list[int] = []


def _on_interrupt(signum, frame) -> None:
    # Ctrl-C and a polite kill become exceptions so that the temporary folder is removed
    _received_signals.append(signum)
    _stop_if_interrupted()


def _stop_if_interrupted() -> None:
    """Raise for a signal received during the export.

    Checked again between stages, because a library may catch the exception
    raised inside its own code and carry on.
    """
    if not _received_signals:
        return
    if _received_signals[0] == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + _received_signals[0])


def _remove_stale_temp_folders(out: Path) -> None:
    """Remove temporary folders that exports killed without cleanup (SIGKILL, power loss) left beside ``out``."""
    for folder in out.parent.glob(f".{out.name}.tmp-*"):
        pid = folder.name[len(f".{out.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by an interrupted export", folder)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished bundle to ``out``; an old bundle there is removed only after the new one is in place."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_model(
    model: Hydra,
    tokenizer_json: str,
    out: Path,
    options: ExportOptions,
    *,
    task: str = "unknown",
    source: str = "",
) -> ExportResult:
    """Export ``model`` to the bundle folder ``out``; raise ExportError if the bundle fails verification."""
    out = Path(out).absolute()
    if model.cfg.ablate:
        # the runtime always adds the PKM read and has no switch for the other components
        raise UsageError(f"the model has {', '.join(model.cfg.ablate)} switched off for an ablation study; "
                         "only complete models can be exported")
    _prepare_destination(out, options.force)
    timings: dict[str, float] = {}
    model = model.eval()
    pinned = None
    if options.moe == "pinned":
        model = copy.deepcopy(model)
        pinned = pin_experts(model, tokenizer_json, options.calib, options.pin_mass)

    with bundle_folder(out) as tmp:
        # 1. trace both graphs with torch.export, then lower them to ONNX
        with _stage("trace", timings):
            programs = {part: trace_graph(model, part) for part in ("head", "tail")}
        # the ONNX exporter prints its progress to stdout; our stages are logged instead
        with _stage("lower", timings), contextlib.redirect_stdout(io.StringIO()):
            protos = {part: lower_graph(programs[part], model, part, options.opset) for part in programs}
        for part, proto in protos.items():
            _check_graph(proto, part)

        # 2. quantize the graphs and the PKM table
        report = QuantizationReport()
        table = model.pkm.values.detach().cpu().numpy().astype(np.float32)
        with _stage("quantize", timings):
            if options.quantize == "int8":
                for part in ("head", "tail"):
                    protos[part], part_report = quantize_graph(protos[part])
                    report.merge(part_report)
                    _check_graph(protos[part], part)
                table_q, table_scale = quantize_rows(table, axis=-1)
                report.quantized.append({"name": "pkm.values", "shape": list(table.shape), "method": "int8 per row, memory-mapped file"})

        # 3. write every file but the manifest
        for part, proto in protos.items():
            onnx.save(proto, tmp / f"{part}.onnx")
        if options.quantize == "int8":
            pkm_entry = {"values": _write_array(tmp / "pkm_values.bin", table_q),
                         "scales": _write_array(tmp / "pkm_scales.bin", table_scale[:, 0])}
        else:
            pkm_entry = {"values": _write_array(tmp / "pkm_values.bin", table)}
        pkm_entry["topk"] = model.cfg.pkm_topk
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")

        # 4. the manifest, last
        state = model.init_state(1)
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "hydra_edge_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source,
            "task": task,
            "model": config_to_dict(model.cfg),
            "position": {"name": "pos", "shape": [], "dtype": "int64"},
            "state": [
                {"name": n, "shape": list(state[n].shape), "dtype": "float32", "graph": part}
                for part in ("head", "tail") for n in model.state_names(part)
            ],
            "graphs": {},
            "pkm": pkm_entry,
            "quantization": {"mode": options.quantize, **asdict(report)},
            "routing": {
                "mode": options.moe,
                "experts": {f"layer{b.index}": b.moe.expert_ids for b in model.blocks if b.moe is not None},
            },
            "tokenizer": {"file": "tokenizer.json"},
        }
        if pinned is not None:
            manifest["routing"]["pin_mass"] = options.pin_mass
            manifest["routing"]["calibration"] = asdict(pinned)
        for part, proto in protos.items():
            inputs, outputs = graph_io_names(model, part)
            manifest["graphs"][part] = {
                "file": f"{part}.onnx",
                "state": model.state_names(part),
                "inputs": _tensor_entries(proto, inputs, "input"),
                "outputs": _tensor_entries(proto, outputs, "output"),
            }

        # 5. verify against the PyTorch step API, then move into place
        verify, total = finish_bundle(tmp, out, manifest, timings, lambda: verify_bundle(
            model, tmp, quantized=options.quantize == "int8", n_tokens=options.verify_tokens))
    return ExportResult(bundle=out, bytes_total=total, stage_seconds=timings, verify=verify,
                        pinned=pinned, quantization=report)
