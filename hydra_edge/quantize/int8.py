"""int8 weight quantization of the exported graphs and of the PKM value table.

Matrix-multiply weights go through onnxruntime's ``quantize_dynamic`` (per
output channel, symmetric int8, activations quantized on the fly with
``DynamicQuantizeLinear``). Two kinds of weights it does not handle are done
here: tables read by ``Gather`` / ``GatherND`` (the token embedding and the
MoE expert weights, whose rows are selected by index) and the PKM value table,
which lives outside the graphs. Both are stored as int8 with one float scale
per row (per output channel for expert matrices) and dequantized after the
gather, so only the rows that are read are ever converted.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

# Weights that pick a discrete route or memory row: a rounding error there
# changes which expert or row is used, not just a value, and they are small.
SELECTION_WEIGHTS = ("router", "subkeys", "default_logits", "pkm.query")
# Weights stored as int8 but multiplied in float (DequantizeLinear before the
# MatMul). The input of the SSM output projection, the gated and normalised SSM
# output, has outlier channels. With int8 over that whole activation tensor,
# a trained hydra-tiny text model changed its top-1 token on 2.0% of WikiText-2
# tokens, and on 1.6% with this weight only (benchmarks/int8_quality.py).
WEIGHT_ONLY = ("ssm.out_proj",)
# Smaller weights stay float: their int8 saving is below the cost of the
# extra quantize and dequantize nodes.
MIN_QUANTIZED_ELEMENTS = 4096
# first name component of every Hydra parameter, as the export passes name them
PARAMETER_ROOTS = ("embed", "blocks", "workspace", "pkm", "norm_f")


@dataclass
class QuantizationReport:
    """Tensors stored as int8, and tensors kept in float with the reason for each."""

    quantized: list[dict] = field(default_factory=list)
    kept_float: list[dict] = field(default_factory=list)

    def merge(self, other: "QuantizationReport") -> None:
        self.quantized += other.quantized
        self.kept_float += other.kept_float


def quantize_rows(table: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 over ``axis``: returns (int8 values, float32 scales with ``axis`` kept as 1)."""
    amax = np.max(np.abs(table), axis=axis, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    return q, scale


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def quantize_gather_tables(model: onnx.ModelProto) -> QuantizationReport:
    """Replace float tables read by Gather/GatherND with int8 tables and gathered scales (in place)."""
    report = QuantizationReport()
    inits = _initializers(model)
    done: dict[str, tuple[str, str]] = {}  # float table -> (int8 table, scales); a table may feed several gathers
    new_nodes = []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type in ("Gather", "GatherND") else None
        if (
            table is None
            or table.data_type != onnx.TensorProto.FLOAT
            or len(table.dims) < 2
            or any(key in table.name for key in SELECTION_WEIGHTS)
            or any(a.name == "axis" and a.i != 0 for a in node.attribute)
        ):
            new_nodes.append(node)
            continue
        if table.name not in done:
            values = numpy_helper.to_array(table)
            # an embedding row is one channel; an expert matrix (E, in, out) has one scale per output column
            q, scale = quantize_rows(values, axis=-1 if values.ndim == 2 else -2)
            done[table.name] = (table.name + ".int8", table.name + ".scale")
            model.graph.initializer.extend([numpy_helper.from_array(q, done[table.name][0]),
                                            numpy_helper.from_array(scale, done[table.name][1])])
            report.quantized.append({"name": table.name, "shape": list(values.shape), "method": "int8 per row, gathered"})
        q_name, s_name = done[table.name]

        out = node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        prefix = node.name or out
        new_nodes += [
            helper.make_node(node.op_type, [q_name, node.input[1]], [out + ".q"], name=prefix + ".q", **attrs),
            helper.make_node(node.op_type, [s_name, node.input[1]], [out + ".s"], name=prefix + ".s", **attrs),
            helper.make_node("Cast", [out + ".q"], [out + ".f"], name=prefix + ".cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [out + ".f", out + ".s"], [out], name=prefix + ".dequant"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)

    # drop float tables that no node reads any more
    used = {name for node in model.graph.node for name in node.input}
    for name in done:
        if name not in used:
            model.graph.initializer.remove(inits[name])
    return report


def quantize_weight_only(model: onnx.ModelProto) -> QuantizationReport:
    """Store the WEIGHT_ONLY matrix-multiply weights as int8 per output channel, dequantized in the graph (in place).

    The weight of ``MatMul(x, W)`` with W (in, out) becomes
    ``DequantizeLinear(W_int8, scale, axis=1)``, so the product runs in float
    on an int8-rounded weight while the file stores one byte per value. The
    runtime's session options make onnxruntime fold the dequantization into a
    float weight at load.
    """
    report = QuantizationReport()
    inits = _initializers(model)
    new_nodes = []
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if (
            weight is None
            or len(weight.dims) != 2
            or not any(key in weight.name for key in WEIGHT_ONLY)
            or any(key in weight.name for key in SELECTION_WEIGHTS)
            or int(np.prod(weight.dims)) < MIN_QUANTIZED_ELEMENTS
        ):
            new_nodes.append(node)
            continue
        q, scale = quantize_rows(numpy_helper.to_array(weight), axis=0)  # one scale per output column
        q_name, s_name = weight.name + ".int8", weight.name + ".scale"
        model.graph.initializer.extend([numpy_helper.from_array(q, q_name),
                                        numpy_helper.from_array(scale.reshape(-1), s_name)])
        model.graph.initializer.remove(weight)
        dequantized = node.output[0] + ".weight"
        new_nodes += [
            helper.make_node("DequantizeLinear", [q_name, s_name], [dequantized], name=node.name + ".dequant", axis=1),
            helper.make_node("MatMul", [node.input[0], dequantized], list(node.output), name=node.name),
        ]
        report.quantized.append({"name": weight.name, "shape": list(weight.dims),
                                 "method": "int8 per channel, weight only: the product runs in float"})
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return report


def _matmul_exclusions(model: onnx.ModelProto) -> tuple[list[str], QuantizationReport]:
    """Names of MatMul/Gemm nodes to keep in float, with the reason for each weight."""
    inits = _initializers(model)
    excluded, report = [], QuantizationReport()
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        size = int(np.prod(weight.dims))
        if any(key in weight.name for key in SELECTION_WEIGHTS):
            why = "selects experts or memory rows by top-k; rounding would change the selection"
        elif size < MIN_QUANTIZED_ELEMENTS:
            why = f"fewer than {MIN_QUANTIZED_ELEMENTS} values; int8 would save less than its extra nodes cost"
        else:
            continue
        excluded.append(node.name)
        report.kept_float.append({"name": weight.name, "shape": list(weight.dims), "why": why})
    return excluded, report


def quantize_matmul_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, QuantizationReport]:
    """Quantize MatMul/Gemm weights with onnxruntime's quantize_dynamic (per channel, int8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    before = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    excluded, report = _matmul_exclusions(model)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, src)
        # quantize_dynamic logs a pre-processing hint to the root logger on every call
        root = logging.getLogger()
        was_disabled = root.disabled
        root.disabled = True
        try:
            quantize_dynamic(
                src, dst, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
            )
        finally:
            root.disabled = was_disabled
        quantized = onnx.load(dst)
    after = {t.name for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    inits = _initializers(model)
    for name in sorted(before - after):
        report.quantized.append({"name": name, "shape": list(inits[name].dims), "method": "int8 per channel, quantize_dynamic"})
    return quantized, report


def describe_float_initializers(model: onnx.ModelProto, report: QuantizationReport) -> None:
    """Add every float weight not yet explained to ``report.kept_float``, with its reason.

    Weights are the initializers named after a model parameter; the remaining
    float initializers are the graph's own constants and get one summary entry.
    """
    known = {entry["name"] for entry in report.kept_float}
    reasons = [
        ("norm", "RMSNorm scale: one value per channel, applied elementwise"),
        ("conv1d", "depthwise convolution: d_conv taps per channel"),
        ("A_log", "SSM decay: one value per head"),
        ("dt_bias", "SSM step size: one value per head"),
        (".D", "SSM skip: one value per head"),
        ("bias", "bias vector, added elementwise"),
        ("slots_init", "learned initial workspace slots, read once at position 0"),
    ]
    constants = 0
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name in known:
            continue
        if not init.name.split(".")[0] in PARAMETER_ROOTS or init.name.endswith(("scale", "_scale")):
            constants += 1
            continue
        why = next((text for key, text in reasons if key in init.name), "small weight")
        report.kept_float.append({"name": init.name, "shape": list(init.dims), "why": why})
        known.add(init.name)
    if constants:
        report.kept_float.append({"name": f"{constants} graph constants and dequantization scales",
                                  "shape": [], "why": "not weights: masks, fill values and int8 scales"})


def quantize_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, QuantizationReport]:
    """Quantize one exported graph: gathered tables first, then matrix-multiply weights."""
    report = quantize_gather_tables(model)
    report.merge(quantize_weight_only(model))
    model, matmul_report = quantize_matmul_weights(model)
    report.merge(matmul_report)
    describe_float_initializers(model, report)
    return model, report
