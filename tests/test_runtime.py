"""The onnxruntime streaming runtime: no torch, constant memory, save and resume, bad input."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from hydra_edge.cli import main
from hydra_edge.errors import BundleError, StateError, UsageError
from hydra_edge.runtime import HydraSession

BLOCK_TORCH = """
import importlib.abc, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=600)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def bundle_copy(tiny_bundles, tmp_path):
    """A private copy of the int8 tiny bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["int8"].bundle, dst)
    return dst


def test_runtime_loads_and_generates_where_torch_cannot_be_imported(tiny_bundles):
    bundle = tiny_bundles["int8"].bundle
    result = run_python(f"""
        from hydra_edge.runtime import HydraSession
        session = HydraSession({str(bundle)!r})
        ids = list(session.generate([1, 2, 3], max_new_tokens=5))
        assert len(ids) == 5 and all(0 <= i < 512 for i in ids), ids
        from hydra_edge.cli import main
        main(["run", {str(bundle)!r}, "--prompt", "The river", "--max-new-tokens", "4"], standalone_mode=False)
        assert "torch" not in sys.modules
        print("no torch")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The river")
    assert result.stdout.strip().endswith("no torch")


def test_resumed_state_in_a_new_process_matches_one_stream(tiny_bundles, tmp_path):
    bundle = tiny_bundles["none"].bundle
    tokens = np.random.default_rng(3).integers(0, 512, 100)
    session = HydraSession(bundle)
    session.feed(tokens[:37])
    expected = session.feed(tokens[37:], all_logits=True)

    np.save(tmp_path / "tokens.npy", tokens)
    state_file, logits_file = tmp_path / "state.npz", tmp_path / "logits.npy"
    first = run_python(f"""
        import numpy as np
        from hydra_edge.runtime import HydraSession
        session = HydraSession({str(bundle)!r})
        session.feed(np.load({str(tmp_path / 'tokens.npy')!r})[:37])
        session.save_state({str(state_file)!r})
    """)
    assert first.returncode == 0, first.stderr
    second = run_python(f"""
        import numpy as np
        from hydra_edge.runtime import HydraSession
        session = HydraSession({str(bundle)!r})
        session.load_state({str(state_file)!r})
        np.save({str(logits_file)!r}, session.feed(np.load({str(tmp_path / 'tokens.npy')!r})[37:], all_logits=True))
    """)
    assert second.returncode == 0, second.stderr
    assert np.abs(np.load(logits_file) - expected).max() <= 1e-5


def test_calls_of_one_token_match_whole_chunks(tiny_bundles):
    session = HydraSession(tiny_bundles["none"].bundle)
    tokens = np.random.default_rng(4).integers(0, 512, 3 * session.chunk + 5)
    whole = session.feed(tokens, all_logits=True)
    session.reset()
    single = np.concatenate([session.feed(tokens[i:i + 1], all_logits=True) for i in range(tokens.size)])
    assert single.shape == whole.shape == (tokens.size, 512)
    assert np.abs(single - whole).max() <= 1e-4


MEMORY_PROBE = """
    import numpy as np, os, psutil
    from hydra_edge.runtime import HydraSession
    session = HydraSession({bundle!r})
    process = psutil.Process(os.getpid())
    rng = np.random.default_rng(0)
    sizes = {sizes!r}

    def stream(n):
        done, k = 0, 0
        while done < n:
            size = sizes[k % len(sizes)]
            session.feed(rng.integers(0, 512, size))
            done, k = done + size, k + 1

    stream(5_000)
    base = process.memory_full_info().uss
    stream(100_000)
    print((process.memory_full_info().uss - base) / 2**20)
"""


@pytest.mark.parametrize(
    "sizes, limit_mib",
    [([16], 2.0), ([1, 7, 16, 33, 5, 11, 2], 5.0)],
    ids=["whole-chunks", "changing-call-lengths"],
)
def test_private_memory_stays_flat_over_100k_tokens(tiny_bundles, sizes, limit_mib):
    result = run_python(MEMORY_PROBE.format(bundle=str(tiny_bundles["int8"].bundle), sizes=sizes))
    assert result.returncode == 0, result.stderr
    growth_mib = float(result.stdout.strip().splitlines()[-1])
    assert growth_mib <= limit_mib


def test_weight_only_int8_runs_as_a_float_matmul(tiny_bundles, tmp_path):
    import onnx
    import onnxruntime as ort

    from hydra_edge.runtime.session import session_options

    opts = session_options(1)
    opts.optimized_model_filepath = str(tmp_path / "head-optimized.onnx")
    ort.InferenceSession(str(tiny_bundles["int8"].bundle / "head.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in onnx.load(tmp_path / "head-optimized.onnx").graph.node}
    # the dequantization is folded at load, so no CPU-specific int8 kernel replaces the float product
    assert "MatMulNBits" not in ops
    assert "DequantizeLinear" not in ops
    assert "DynamicQuantizeMatMul" in ops  # the other weights keep quantize_dynamic's kernels


def test_long_prompt_is_fed_in_chunks(tiny_bundles):
    session = HydraSession(tiny_bundles["int8"].bundle)
    prompt = list(np.random.default_rng(5).integers(0, 512, 5 * session.chunk + 3))
    out = list(session.generate(prompt, max_new_tokens=3))
    assert len(out) == 3
    assert session.pos == len(prompt) + 3  # the stream contains the prompt and every generated token


def test_sampling_is_repeatable_with_a_seed(tiny_bundles):
    from hydra_edge.runtime.sampling import SamplingOptions

    session = HydraSession(tiny_bundles["int8"].bundle)
    options = SamplingOptions(temperature=0.8, top_k=50, top_p=0.9, seed=7)
    first = list(session.generate([5, 6, 7], max_new_tokens=10, sampling=options))
    session.reset()
    second = list(session.generate([5, 6, 7], max_new_tokens=10, sampling=options))
    assert first == second


def test_streaming_a_file_reports_perplexity(tiny_bundles, tmp_path):
    from conftest import SAMPLE_TEXT

    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    result = cli("run", tiny_bundles["int8"].bundle, "--file", text, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output
    assert "tokens/s" in result.output


def test_stream_can_stop_and_continue_from_the_cli(tiny_bundles, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The river rises in the hills.\n")
    state = tmp_path / "state.npz"
    first = cli("run", tiny_bundles["int8"].bundle, "--file", text, "--no-progress", "--save-state", state)
    assert first.exit_code == 0, first.output
    second = cli("run", tiny_bundles["int8"].bundle, "--file", text, "--no-progress", "--resume-state", state)
    assert second.exit_code == 0, second.output
    tokens = int(first.output.split("tokens")[1].split()[0].replace(",", ""))
    assert f"position {2 * tokens:,}".replace(" ", "") in second.output.replace(" ", "")


# -- bad input ---------------------------------------------------------------------


def test_empty_prompt_is_a_usage_error(tiny_bundles):
    result = cli("run", tiny_bundles["int8"].bundle, "--prompt", "   ")
    assert result.exit_code == 2
    assert "error: --prompt is empty; give some text to continue" in result.output


def test_missing_bundle_file(bundle_copy):
    (bundle_copy / "tail.onnx").unlink()
    result = cli("run", bundle_copy, "--prompt", "The river")
    assert result.exit_code == 1
    assert "tail.onnx is missing from the bundle; export the bundle again" in result.output
    assert "Traceback" not in result.output


def test_altered_bundle_file(bundle_copy):
    data = bytearray((bundle_copy / "pkm_values.bin").read_bytes())
    data[100] ^= 0x01
    (bundle_copy / "pkm_values.bin").write_bytes(bytes(data))
    result = cli("run", bundle_copy, "--prompt", "The river")
    assert result.exit_code == 1
    assert "pkm_values.bin does not match its sha256 in the manifest; the file was altered" in result.output


def test_newer_manifest_version(bundle_copy):
    manifest = json.loads((bundle_copy / "hydra.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "hydra.json").write_text(json.dumps(manifest))
    result = cli("run", bundle_copy, "--prompt", "The river")
    assert result.exit_code == 1
    assert "has format version 99, newer than the 1 this hydra-edge reads; upgrade hydra-edge" in result.output


def test_pkm_table_of_the_wrong_size(bundle_copy):
    manifest = json.loads((bundle_copy / "hydra.json").read_text())
    table = bundle_copy / "pkm_values.bin"
    table.write_bytes(table.read_bytes()[:-64])
    # keep the manifest consistent with the damaged file so that only the shape check can catch it
    manifest["files"]["pkm_values.bin"]["bytes"] = table.stat().st_size
    (bundle_copy / "hydra.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"pkm_values.bin has 16320 bytes but shape \[256, 64\] of int8 needs 16384"):
        HydraSession(bundle_copy, check_hashes=False)


def test_token_ids_out_of_range(tiny_bundles):
    session = HydraSession(tiny_bundles["int8"].bundle)
    with pytest.raises(UsageError, match=r"token id 512 is out of range; ids must be in \[0, 512\)"):
        session.feed([1, 512])
    with pytest.raises(UsageError, match=r"token id -1 is out of range"):
        session.feed([-1])
    with pytest.raises(UsageError, match="no tokens to feed"):
        session.feed([])
    assert session.pos == 0


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty; give a text file with at least two tokens"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00", "is a binary file (NUL byte at byte 7); give a UTF-8 text file"),
        (b"caf\xe9 au lait\n", "is not UTF-8 text (invalid byte near byte 3)"),
    ],
    ids=["empty", "binary", "latin-1"],
)
def test_unusable_text_file(tiny_bundles, tmp_path, content, message):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    result = cli("run", tiny_bundles["int8"].bundle, "--file", path)
    assert result.exit_code == 2
    assert message in result.output
    # the error is the only line: no progress bar is drawn before it
    assert result.output.count("\n") == 1
    assert "streaming" not in result.output


def test_state_file_from_another_bundle(tiny_bundles, tmp_path):
    state = tmp_path / "state.npz"
    other = HydraSession(tiny_bundles["none"].bundle)
    other.feed([1, 2, 3])
    other.save_state(state)
    result = cli("run", tiny_bundles["int8"].bundle, "--prompt", "The river", "--resume-state", state)
    assert result.exit_code == 1
    assert "was saved from another bundle; resume it with the bundle that wrote it" in result.output


def test_truncated_state_file(tiny_bundles, tmp_path):
    session = HydraSession(tiny_bundles["int8"].bundle)
    session.feed([1, 2, 3])
    state = tmp_path / "state.npz"
    session.save_state(state)
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(StateError, match="is not a readable state file .*; it may be truncated"):
        session.load_state(state)
    assert session.pos == 3
