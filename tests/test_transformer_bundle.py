"""The transformer baseline as a bundle: export, parity with the PyTorch step API, and its runtime session."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from conftest import TOKENIZER_JSON
from hydra_edge.cli import main
from hydra_edge.config import get_preset
from hydra_edge.errors import BundleError, UsageError
from hydra_edge.export.bundle import ExportOptions
from hydra_edge.export.transformer import export_transformer
from hydra_edge.model import build_model
from hydra_edge.runtime import HydraSession
from hydra_edge.runtime.transformer_session import TransformerSession, open_session

# several calls of each kind: single tokens, a prime, exactly chunk (16), and longer than chunk
MIXED_SIZES = [1, 5, 16, 40, 3, 1, 17, 64, 2, 1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch on tiny tensors runs much slower with two threads on a busy machine than with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, one_torch_thread):
    """A random transformer-tiny, its float32 bundle exported from the CLI and its int8 bundle."""
    from hydra_edge.train.checkpoint import save_checkpoint
    from hydra_edge.train.tokenizer import build_logic_tokenizer

    folder = tmp_path_factory.mktemp("transformer")
    torch.manual_seed(0)
    cfg = get_preset("transformer-tiny")
    model = build_model(cfg).eval()
    checkpoint = folder / "baseline.pt"
    save_checkpoint(checkpoint, model, cfg, build_logic_tokenizer(), task="logic", train={"steps": 0})
    cli_result = CliRunner().invoke(main, ["export", str(checkpoint), "--quantize", "none"])
    int8 = export_transformer(model, TOKENIZER_JSON, folder / "int8", ExportOptions(quantize="int8"))
    return {"model": model, "cli": cli_result, "none": folder / "baseline-f32", "int8": int8.bundle}


def compare_stream(model, session, sizes, seed=1):
    """Feed the same calls to PyTorch and the bundle; return the max logit diff and the max diff per cache."""
    rng = np.random.default_rng(seed)
    state = model.init_state(1)
    session.reset()
    worst_logits, worst_cache = 0.0, {}
    for n in sizes:
        tokens = rng.integers(0, model.cfg.vocab_size, n)
        with torch.no_grad():
            ref, state = model.step(torch.from_numpy(tokens)[None], state)
        got = session.step(tokens)
        assert got.shape == (n, model.cfg.vocab_size)
        worst_logits = max(worst_logits, float(np.abs(got - ref[0].numpy()).max()))
        for name, value in session.state.items():
            assert value.shape == state[name].shape, name
            worst_cache[name] = max(worst_cache.get(name, 0.0), float(np.abs(value - state[name].numpy()).max()))
    return worst_logits, worst_cache


def test_cli_exports_a_transformer_checkpoint(bundles):
    result = bundles["cli"]
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in bundles["none"].iterdir()) == ["decoder.onnx", "hydra.json", "tokenizer.json"]
    for stage in ("trace", "lower", "quantize", "verify", "write"):
        assert f"\n{stage} " in result.output
    assert "logits max abs diff" in result.output
    assert f"wrote {bundles['none']}" in result.output


def test_float_bundle_matches_mixed_calls(bundles):
    session = TransformerSession(bundles["none"])
    logits_diff, cache_diff = compare_stream(bundles["model"], session, MIXED_SIZES)
    assert session.pos == sum(MIXED_SIZES)
    assert logits_diff < 1e-3
    for name, diff in cache_diff.items():
        assert diff < 1e-3, name


def test_float_bundle_matches_later_position(bundles):
    model = bundles["model"]
    session = TransformerSession(bundles["none"])
    prefix = torch.from_numpy(np.random.default_rng(2).integers(0, 512, 37))[None]
    with torch.no_grad():
        _, state = model.step(prefix, model.init_state(1))
    session.feed(prefix[0].numpy())
    tokens = np.random.default_rng(3).integers(0, 512, 9)
    with torch.no_grad():
        ref, _ = model.step(torch.from_numpy(tokens)[None], state)
    assert np.abs(session.feed(tokens, all_logits=True) - ref[0].numpy()).max() < 1e-3


def test_int8_bundle_runs_close_to_float(bundles):
    float_session = TransformerSession(bundles["none"])
    int8_session = TransformerSession(bundles["int8"])
    tokens = np.random.default_rng(4).integers(0, 512, 100)
    want = float_session.feed(tokens, all_logits=True)
    got = int8_session.feed(tokens, all_logits=True)
    centred = want - want.mean(-1, keepdims=True)
    relative_rms = np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(centred**2))
    assert relative_rms < 0.25
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.8

    ids = list(int8_session.generate([1, 2, 3], max_new_tokens=5))
    assert len(ids) == 5
    assert all(0 <= i < 512 for i in ids)


def test_int8_quantizes_tied_output_head(bundles):
    manifest = json.loads((bundles["int8"] / "hydra.json").read_text())
    quantized = {entry["name"] for entry in manifest["quantization"]["quantized"]}
    assert {"embed.weight", "embed.weight.T", "blocks.0.qkv.weight.T", "blocks.3.proj.weight.T"} <= quantized
    assert (bundles["int8"] / "decoder.onnx").stat().st_size < 0.5 * (bundles["none"] / "decoder.onnx").stat().st_size


def test_manifest_describes_a_growing_cache(bundles):
    manifest = json.loads((bundles["int8"] / "hydra.json").read_text())
    assert manifest["model"]["kind"] == "transformer"
    assert "pkm" not in manifest
    assert manifest["state"][0] == {"name": "layer0.k_cache", "shape": [1, 4, "S", 16], "dtype": "float32",
                                    "graph": "decoder"}
    inputs = {e["name"]: e["shape"] for e in manifest["graphs"]["decoder"]["inputs"]}
    outputs = {e["name"]: e["shape"] for e in manifest["graphs"]["decoder"]["outputs"]}
    assert inputs["tokens"] == [1, "T"]
    assert inputs["layer3.v_cache"] == [1, 4, "S", 16]
    assert outputs["logits"] == [1, "T", 512]
    assert outputs["new.layer3.v_cache"] == [1, 4, "S + T", 16]
    assert set(manifest["files"]) == {"decoder.onnx", "tokenizer.json"}


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_graph_uses_standard_ops_only(bundles, quantize):
    proto = onnx.load(bundles[quantize] / "decoder.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    assert not {node.op_type for node in proto.graph.node} & {"If", "Loop", "Scan"}


def test_short_calls_match_one_call(bundles):
    tokens = np.random.default_rng(5).integers(0, 512, 90)
    whole = TransformerSession(bundles["none"], max_call_tokens=90).feed(tokens, all_logits=True)
    pieces = TransformerSession(bundles["none"], max_call_tokens=7)
    assert pieces.chunk == 7
    split = pieces.feed(tokens, all_logits=True)
    assert split.shape == whole.shape == (90, 512)
    assert np.abs(split - whole).max() < 1e-4
    assert pieces.state["layer0.k_cache"].shape == (1, 4, 90, 16)
    assert pieces.cache_bytes == 4 * 2 * 4 * 90 * 16 * 4  # layers, k and v, heads, positions, head_dim, float32


def test_saved_state_resumes_identically(bundles, tmp_path):
    tokens = np.random.default_rng(6).integers(0, 512, 50)
    session = TransformerSession(bundles["int8"])
    session.feed(tokens[:37])
    session.save_state(tmp_path / "state.npz")
    expected = session.feed(tokens[37:], all_logits=True)

    resumed = TransformerSession(bundles["int8"])
    resumed.load_state(tmp_path / "state.npz")
    assert resumed.pos == 37
    assert np.abs(resumed.feed(tokens[37:], all_logits=True) - expected).max() <= 1e-5


def test_open_session_picks_transformer_class(bundles):
    session = open_session(bundles["int8"], threads=1)
    assert isinstance(session, TransformerSession)
    assert session.vocab_size == 512


def test_hydra_session_rejects_a_transformer_bundle(bundles):
    with pytest.raises(BundleError, match="contains a transformer model"):
        HydraSession(bundles["int8"])


def test_token_ids_out_of_range(bundles):
    session = TransformerSession(bundles["int8"])
    with pytest.raises(UsageError, match=r"token id 512 is out of range; ids must be in \[0, 512\)"):
        session.feed([1, 512])
    with pytest.raises(UsageError, match="no tokens to feed"):
        session.feed([])
    assert session.pos == 0


def test_edited_cache_shape_in_manifest(bundles, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundles["int8"], copy)
    manifest = json.loads((copy / "hydra.json").read_text())
    manifest["state"][0]["shape"] = [1, 4, "S", 32]
    (copy / "hydra.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"gives layer0.k_cache shape \[1, 4, 'S', 32\] float32 but the graph takes"):
        TransformerSession(copy)


def test_transformer_rejects_pinned_experts(bundles, tmp_path):
    options = ExportOptions(moe="pinned", calib=tmp_path / "calib.txt")
    with pytest.raises(UsageError, match="applies to Hydra's experts; a transformer has none"):
        export_transformer(bundles["model"], TOKENIZER_JSON, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()
