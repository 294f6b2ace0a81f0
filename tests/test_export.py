"""Export: the bundle under onnxruntime against the PyTorch step API, and the bundle's files."""

import json
import os

import numpy as np
import onnx
import pytest
import torch

from conftest import TOKENIZER_JSON, random_hydra
from hydra_edge.errors import ExportError, UsageError
from hydra_edge.export import bundle as bundle_module
from hydra_edge.export.bundle import ExportOptions, export_model
from hydra_edge.export.verify import Check, VerifyReport
from hydra_edge.runtime import HydraSession

MIXED_SIZES = [1, 5, 32, 7, 3, 11, 2, 64, 13]


def compare_stream(model, session, length, sizes=MIXED_SIZES, seed=1):
    """Feed the same tokens to PyTorch and the bundle in mixed call sizes; return the max logit and state diffs."""
    chunk = model.cfg.chunk
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model.cfg.vocab_size, length)
    state = model.init_state(1)
    session.reset()
    worst_logits, worst_state, pos, k = 0.0, {}, 0, 0
    while pos < length:
        n = min(sizes[k % len(sizes)], chunk - pos % chunk, length - pos)
        with torch.no_grad():
            ref, state = model.step(torch.from_numpy(tokens[pos:pos + n])[None], state)
        got = session.step(tokens[pos:pos + n])
        worst_logits = max(worst_logits, float(np.abs(got - ref[0].numpy()).max()))
        for name, value in session.state.items():
            worst_state[name] = max(worst_state.get(name, 0.0), float(np.abs(value - state[name].numpy()).max()))
        pos, k = pos + n, k + 1
    return worst_logits, worst_state


def test_float_bundle_matches_step_api_on_tiny(tiny_bundles):
    model = tiny_bundles["model"]
    session = HydraSession(tiny_bundles["none"].bundle)
    chunk = model.cfg.chunk
    logits_diff, state_diff = compare_stream(model, session, 3 * chunk + chunk // 2 + 3)
    assert logits_diff < 1e-3
    for name, diff in state_diff.items():
        assert diff < 1e-3, name


def test_float_and_int8_bundles_of_hydra_29m(tmp_path):
    model = random_hydra("hydra-29m")
    f32 = export_model(model, TOKENIZER_JSON, tmp_path / "f32", ExportOptions(quantize="none", verify_tokens=130))
    session = HydraSession(f32.bundle)
    chunk = model.cfg.chunk
    logits_diff, state_diff = compare_stream(model, session, 3 * chunk + chunk // 2 + 3)
    assert logits_diff < 1e-3
    for name, diff in state_diff.items():
        assert diff < 1e-3, name

    int8 = export_model(model, TOKENIZER_JSON, tmp_path / "int8", ExportOptions(quantize="int8", verify_tokens=130))
    assert int8.bytes_total <= 0.30 * f32.bytes_total
    pkm_file = int8.bundle / "pkm_values.bin"
    assert pkm_file.stat().st_size == model.cfg.pkm_size * model.cfg.d_model  # int8, one byte a value
    assert isinstance(HydraSession(int8.bundle)._pkm_values, np.memmap)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_graphs_have_only_standard_ops_and_no_control_flow(tiny_bundles, quantize):
    bundle = tiny_bundles[quantize].bundle
    for part in ("head", "tail"):
        proto = onnx.load(bundle / f"{part}.onnx")
        onnx.checker.check_model(proto, full_check=True)
        domains = {node.domain for node in proto.graph.node}
        assert domains <= {"", "ai.onnx"}, domains
        ops = {node.op_type for node in proto.graph.node}
        assert not ops & {"If", "Loop", "Scan"}


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_graph_state_io_matches_manifest(tiny_bundles, quantize):
    bundle = tiny_bundles[quantize].bundle
    manifest = json.loads((bundle / "hydra.json").read_text())
    spec = {s["name"]: s for s in manifest["state"]}
    seen = set()
    for part in ("head", "tail"):
        proto = onnx.load(bundle / f"{part}.onnx")
        inputs = {v.name: v for v in proto.graph.input}
        outputs = {v.name: v for v in proto.graph.output}
        for name in manifest["graphs"][part]["state"]:
            for value in (inputs[name], outputs["new." + name]):
                tensor_type = value.type.tensor_type
                assert [d.dim_value for d in tensor_type.shape.dim] == spec[name]["shape"], name
                assert tensor_type.elem_type == onnx.TensorProto.FLOAT, name
            seen.add(name)
        chunk_axis = inputs["tokens" if part == "head" else "hidden"].type.tensor_type.shape.dim[1]
        assert chunk_axis.dim_param == "T"
        assert inputs["pos"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert seen == set(spec)


def test_every_expert_is_in_the_bundle_and_matches_pytorch(tiny_bundles):
    model = tiny_bundles["model"]
    session = HydraSession(tiny_bundles["none"].bundle)
    cfg = model.cfg
    moe_layers = [b.index for b in model.blocks if b.moe is not None]
    tokens = np.arange(5, dtype=np.int64)
    for expert in range(cfg.n_experts):
        # a mid-chunk state whose route puts this expert first in every MoE block
        state = model.init_state(1)
        with torch.no_grad():
            _, state = model.step(torch.arange(cfg.chunk + 3)[None, :cfg.chunk], state)
            _, state = model.step(torch.arange(3)[None], state)
        for layer in moe_layers:
            logits = torch.full((1, cfg.n_experts), -5.0)
            logits[0, expert] = 5.0
            logits[0, (expert + 1) % cfg.n_experts] = 1.0
            state[f"layer{layer}.route_logits"] = logits
        session.pos = int(state["pos"])
        session.state = {n: state[n].numpy().copy() for n in session.state}
        with torch.no_grad():
            ref, _ = model.step(torch.from_numpy(tokens)[None], state)
        got = session.step(tokens)
        assert np.abs(got - ref[0].numpy()).max() < 1e-3, f"expert {expert}"


def test_int8_bundle_stays_close_to_float(tiny_bundles):
    report = tiny_bundles["int8"].verify
    checks = {c.name: c.value for c in report.checks}
    assert checks["top-1 agreement vs float"] >= 0.8
    assert checks["logits relative RMS error vs float"] <= 0.25
    quant = json.loads((tiny_bundles["int8"].bundle / "hydra.json").read_text())["quantization"]
    quantized = {q["name"] for q in quant["quantized"]}
    assert "pkm.values" in quantized
    assert any("w_gate" in name for name in quantized)
    assert all(entry["why"] for entry in quant["kept_float"])


def test_ssm_output_projection_is_int8_weight_only(tiny_bundles):
    bundle = tiny_bundles["int8"].bundle
    manifest = json.loads((bundle / "hydra.json").read_text())
    methods = {q["name"]: q["method"] for q in manifest["quantization"]["quantized"]}
    names = [f"blocks.{i}.ssm.out_proj.weight.T" for i in range(4)]
    assert all(methods[n] == "int8 per channel, weight only: the product runs in float" for n in names)
    for part in ("head", "tail"):
        graph = onnx.load(bundle / f"{part}.onnx").graph
        inits = {t.name: t for t in graph.initializer}
        dequants = [n for n in graph.node if n.op_type == "DequantizeLinear" and "out_proj" in n.input[0]]
        assert len(dequants) == (3 if part == "head" else 1)  # blocks 0-2 before the PKM, block 3 after
        for node in dequants:
            assert inits[node.input[0]].data_type == onnx.TensorProto.INT8
            assert list(inits[node.input[1]].dims) == [64]  # one scale per output channel (d_model)
        assert not any(name.endswith("ssm.out_proj.weight.T") for name in inits)  # no float copy left


def test_int8_top1_skips_float_near_ties():
    from hydra_edge.export.verify import int8_checks

    want = np.array([[2.0, 0.0, 0.0],    # decided: margin 2 nats
                     [1.0, 0.9, 0.0],    # near-tie: margin 0.1 nats
                     [0.0, 3.0, 1.0]])   # decided
    got = np.array([[2.0, 0.1, 0.0],     # agrees
                    [0.9, 1.0, 0.0],     # flips the near-tie: not counted
                    [0.0, 1.0, 3.0]])    # flips a decided position: counted
    checks = {c.name: c.value for c in int8_checks(got, want)}
    assert checks["top-1 agreement vs float"] == 0.5
    # with no decided position at all, every position counts
    flat = np.array([[1.0, 0.9], [0.5, 0.6]])
    checks = {c.name: c.value for c in int8_checks(flat[:, ::-1].copy(), flat)}
    assert checks["top-1 agreement vs float"] == 0.0


def test_existing_bundle_needs_force(tiny_bundles, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("earlier bundle")
    with pytest.raises(UsageError, match="already exists; pass --force to replace it"):
        export_model(tiny_bundles["model"], TOKENIZER_JSON, out, ExportOptions(quantize="none"))
    assert (out / "keep.txt").read_text() == "earlier bundle"


def test_failed_verification_leaves_no_bundle_and_keeps_the_old_one(tiny_bundles, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("earlier bundle")
    failing = VerifyReport(tokens=10, checks=[Check("logits max abs diff", 0.5, 1e-3)])
    monkeypatch.setattr(bundle_module, "verify_bundle", lambda *a, **k: failing)
    with pytest.raises(ExportError, match=r"verification failed, no bundle written: logits max abs diff = 0.5 \(limit 0.001\)"):
        export_model(tiny_bundles["model"], TOKENIZER_JSON, out, ExportOptions(quantize="none", force=True))
    assert os.listdir(tmp_path) == ["bundle"]
    assert os.listdir(out) == ["keep.txt"]


def test_force_replaces_an_existing_bundle(tiny_bundles, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    export_model(tiny_bundles["model"], TOKENIZER_JSON, out, ExportOptions(quantize="none", force=True, verify_tokens=20))
    assert not (out / "old.txt").exists()
    assert (out / "hydra.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["bundle"]


def test_pinned_export_drops_experts_and_reports_quality(tmp_path):
    model = random_hydra("hydra-tiny")
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat " * 200)
    full = export_model(model, TOKENIZER_JSON, tmp_path / "gather", ExportOptions(quantize="none", verify_tokens=20))
    pinned = export_model(model, TOKENIZER_JSON, tmp_path / "pinned",
                          ExportOptions(quantize="none", moe="pinned", calib=calib, verify_tokens=40))
    result = pinned.pinned
    assert result is not None
    from tokenizers import Tokenizer

    assert result.calib_tokens == len(Tokenizer.from_str(TOKENIZER_JSON).encode("the cat " * 200).ids)
    for layer, kept in result.kept.items():
        assert model.cfg.top_k <= len(kept) < model.cfg.n_experts, layer
    assert pinned.bytes_total < full.bytes_total
    assert np.isfinite(result.perplexity_change)
    manifest = json.loads((pinned.bundle / "hydra.json").read_text())
    assert manifest["routing"]["mode"] == "pinned"
    assert manifest["routing"]["experts"] == result.kept
    # the source model is untouched
    assert all(b.moe.n_experts == model.cfg.n_experts for b in model.blocks if b.moe is not None)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(moe="pinned"), "--moe pinned needs --calib TEXT_FILE"),
        (dict(quantize="int4"), "--quantize must be 'int8' or 'none', got 'int4'"),
        (dict(opset=9), "--opset must be between 18 and 21, got 9"),
    ],
)
def test_export_options_reject_invalid_values(options, message):
    with pytest.raises(UsageError, match=message):
        ExportOptions(**options)
