"""Small rewrites of an exported ONNX graph before quantization.

The ONNX exporter folds transposes of weights into new constants with
generated names (``val_14``) and lowers some linear layers to ``Gemm``.
These passes give every weight back the name of its PyTorch parameter, so
that the manifest's quantization report can be read, and turn ``Gemm`` with
a constant weight into ``MatMul`` + ``Add``, so that every linear layer is
one ``MatMul`` node whose second input is a named weight.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _digest(array: np.ndarray) -> tuple[tuple[int, ...], str]:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return array.shape, hashlib.sha1(array.tobytes()).hexdigest()


def _rename_everywhere(proto: onnx.ModelProto, old: str, new: str) -> None:
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def name_initializers(proto: onnx.ModelProto, params: dict[str, np.ndarray]) -> None:
    """Rename float initializers that equal a parameter (or its transpose) to ``name`` or ``name.T``."""
    known: dict[tuple, str | None] = {}
    for name, value in params.items():
        candidates = [(_digest(value), name)]
        if value.ndim >= 2:
            candidates.append((_digest(np.swapaxes(value, -1, -2)), name + ".T"))
        for digest, label in candidates:
            # equal parameters (all-ones norms at init, say) give no name rather than a wrong one
            known[digest] = None if digest in known else label
    taken = {t.name for t in proto.graph.initializer}
    for init in proto.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name in params or len(init.dims) == 0:
            continue
        target = known.get(_digest(numpy_helper.to_array(init)))
        if target is None or target in taken:
            continue
        taken.add(target)
        _rename_everywhere(proto, init.name, target)
        init.name = target


def gemm_to_matmul(proto: onnx.ModelProto) -> None:
    """Rewrite ``Gemm(A, W, C)`` with constant W and no transA as ``MatMul(A, W') + C``."""
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" else None
        if weight is None or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        w_name = weight.name
        if attrs.get("transB", 0):
            w_name = weight.name[:-2] if weight.name.endswith(".T") else weight.name + ".T"
            if w_name not in inits:
                w_t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), w_name)
                proto.graph.initializer.append(w_t)
                inits[w_name] = w_t
        product = node.output[0] + ".matmul" if len(node.input) > 2 else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [product], name=node.name))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + ".bias"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {name for node in proto.graph.node for name in node.input}
    for init in list(proto.graph.initializer):
        if init.name not in used:
            proto.graph.initializer.remove(init)


def fold_weight_transposes(proto: onnx.ModelProto) -> None:
    """Replace ``Transpose`` of a 2-D weight with a transposed copy named ``<weight>.T``.

    The output head is tied to the embedding, and the exporter keeps
    ``Transpose(embed.weight)`` as a node because the embedding ``Gather``
    reads the same initializer. Without this pass the head's ``MatMul`` has no
    constant weight, so int8 quantization would leave it in float.
    """
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        weight = inits.get(node.input[0]) if node.op_type == "Transpose" else None
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if weight is None or len(weight.dims) != 2 or perm not in ([], [[1, 0]]):
            continue
        name = weight.name + ".T"
        if name not in inits:
            transposed = np.ascontiguousarray(numpy_helper.to_array(weight).T)
            inits[name] = numpy_helper.from_array(transposed, name)
            proto.graph.initializer.append(inits[name])
        for consumer in proto.graph.node:
            for i, value in enumerate(consumer.input):
                if value == node.output[0]:
                    consumer.input[i] = name
    # the Transpose nodes now feed nothing
    needed = {value for node in proto.graph.node for value in node.input}
    needed |= {value.name for value in proto.graph.output}
    remaining = [n for n in proto.graph.node if n.op_type != "Transpose" or n.output[0] in needed]
    del proto.graph.node[:]
    proto.graph.node.extend(remaining)
