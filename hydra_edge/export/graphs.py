"""Lowering of the Hydra step API to two ONNX graphs.

``head``: token ids, position and the state of the blocks up to the PKM ->
the hidden state, the PKM rows to read, their weights, and the new state.
``tail``: the hidden state with the PKM read added, position and the state of
the remaining blocks -> logits and the new state. The chunk length T is a
dynamic axis (1 <= T <= chunk); the batch is 1.
"""

from __future__ import annotations

import logging
import warnings

import onnx
import torch
from torch import nn

from ..model.hydra import Hydra
from .onnx_passes import fold_weight_transposes, gemm_to_matmul, name_initializers

log = logging.getLogger(__name__)

NEW_PREFIX = "new."


class HeadGraph(nn.Module):
    def __init__(self, model: Hydra) -> None:
        super().__init__()
        self.model = model
        self.names = model.state_names("head")

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, states: list[torch.Tensor]):
        hidden, rows, weights, new = self.model.head(tokens, pos, dict(zip(self.names, states)))
        return (hidden, rows, weights, *(new[n] for n in self.names))


class TailGraph(nn.Module):
    def __init__(self, model: Hydra) -> None:
        super().__init__()
        self.model = model
        self.names = model.state_names("tail")

    def forward(self, hidden: torch.Tensor, pos: torch.Tensor, states: list[torch.Tensor]):
        logits, new = self.model.tail(hidden, pos, dict(zip(self.names, states)))
        return (logits, *(new[n] for n in self.names))


def graph_io_names(model: Hydra, part: str) -> tuple[list[str], list[str]]:
    """Input and output names of the ``head`` or ``tail`` graph."""
    states = model.state_names(part)
    new_states = [NEW_PREFIX + n for n in states]
    if part == "head":
        return ["tokens", "pos", *states], ["hidden", "pkm_rows", "pkm_weights", *new_states]
    return ["hidden", "pos", *states], ["logits", *new_states]


def trace_graph(model: Hydra, part: str) -> torch.export.ExportedProgram:
    """Trace ``model.head`` or ``model.tail`` with torch.export, the chunk length T dynamic."""
    cfg = model.cfg
    state = model.init_state(1)
    names = model.state_names(part)
    t = max(2, cfg.chunk // 2)  # a length that is neither 1 nor chunk, so neither is frozen in
    if part == "head":
        wrapper: nn.Module = HeadGraph(model)
        first = torch.zeros(1, t, dtype=torch.long)
        first_name = "tokens"
    else:
        wrapper = TailGraph(model)
        first = torch.zeros(1, t, cfg.d_model)
        first_name = "hidden"
    seq = torch.export.Dim("T", min=1, max=cfg.chunk)
    dynamic_shapes = {first_name: {1: seq}, "pos": None, "states": [None] * len(names)}
    args = (first, state["pos"], [state[n] for n in names])
    return torch.export.export(wrapper.eval(), args, dynamic_shapes=dynamic_shapes, strict=False)


def program_to_onnx(program: torch.export.ExportedProgram, model: nn.Module, input_names: list[str],
                    output_names: list[str], opset: int) -> onnx.ModelProto:
    """Run the ONNX exporter on a traced program and name every weight after its parameter."""
    # the exporter warns about every torchvision operator it cannot register; we use none of them
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program, input_names=input_names, output_names=output_names,
            opset_version=opset, dynamo=True, verbose=False, optimize=True,
        )
    proto = onnx_program.model_proto
    name_initializers(proto, {name: p.detach().cpu().numpy() for name, p in model.named_parameters()})
    fold_weight_transposes(proto)
    gemm_to_matmul(proto)
    return proto


def lower_graph(program: torch.export.ExportedProgram, model: Hydra, part: str, opset: int) -> onnx.ModelProto:
    """Convert a traced graph to ONNX with the manifest's input and output names."""
    input_names, output_names = graph_io_names(model, part)
    proto = program_to_onnx(program, model, input_names, output_names, opset)
    # torch names the dynamic axis after its symbol; give it the manifest's name
    for value in list(proto.graph.input) + list(proto.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = "T"
    return proto
