"""hydra-edge profile: per-length measurements in fresh processes, the JSON and PNG files, and the bounds."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import SAMPLE_TEXT, TOKENIZER_JSON
from hydra_edge.cli import main
from hydra_edge.errors import BundleError, UsageError
from hydra_edge.profile import STATUS_MEMORY, STATUS_OK, STATUS_TIMEOUT, parse_lengths, profile_bundle, table_rows
from hydra_edge.profile.plot import plot_profiles

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

BLOCK_IMPORTS = """
import importlib.abc, sys
class BlockImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(name + " is blocked in this test")
sys.meta_path.insert(0, BlockImports())
"""


def run_python(code: str, blocked: set[str]) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter in which importing any package in ``blocked`` fails."""
    script = BLOCK_IMPORTS.format(blocked=sorted(blocked)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def transformer_bundle(tmp_path_factory):
    """transformer-tiny with random weights, exported to int8."""
    from hydra_edge.config import get_preset
    from hydra_edge.export.bundle import ExportOptions
    from hydra_edge.export.transformer import export_transformer
    from hydra_edge.model import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is much faster on a busy machine
    try:
        torch.manual_seed(0)
        model = build_model(get_preset("transformer-tiny")).eval()
        folder = tmp_path_factory.mktemp("profile")
        return export_transformer(model, TOKENIZER_JSON, folder / "transformer-int8", ExportOptions()).bundle
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cli_run(tiny_bundles, transformer_bundle, tmp_path_factory):
    """``hydra-edge profile`` of tiny Hydra against tiny transformer, run where torch cannot be imported."""
    folder = tmp_path_factory.mktemp("profile-cli")
    args = ["profile", str(tiny_bundles["int8"].bundle), "--baseline", str(transformer_bundle),
            "--lengths", "64,128", "--decode-tokens", "4", "--json", str(folder / "out.json"),
            "--plot", str(folder / "out.png")]
    result = run_python(f"""
        from hydra_edge.cli import main
        main({args!r}, standalone_mode=False)
        assert "torch" not in sys.modules
    """, blocked={"torch"})
    return result, folder


def test_profile_runs_without_torch(cli_run):
    result, _ = cli_run
    assert result.returncode == 0, result.stderr
    assert "prefill tok/s" in result.stdout
    assert "hydra-tiny int8 relative to transformer-tiny int8" in result.stdout


def test_profile_json_has_every_field(cli_run):
    _, folder = cli_run
    doc = json.loads((folder / "out.json").read_text())
    assert doc["format"] == "hydra-edge-profile/1"
    assert {"cpu", "cores", "onnxruntime", "numpy", "python"} <= set(doc["machine"])
    assert doc["settings"]["lengths"] == [64, 128]
    assert doc["settings"]["threads"] == 1
    assert [b["kind"] for b in doc["bundles"]] == ["hydra", "transformer"]
    assert [b["label"] for b in doc["bundles"]] == ["hydra-tiny int8", "transformer-tiny int8"]
    for bundle in doc["bundles"]:
        assert [r["length"] for r in bundle["results"]] == [64, 128]
        for r in bundle["results"]:
            assert r["status"] == "ok", r
            assert r["prefill_tokens_done"] == r["length"]
            assert r["prefill_tps"] > 0
            assert r["decode_tokens"] == 4
            assert r["decode_tps"] > 0
            assert r["decode_state"] == "prefilled"
            assert r["peak_rss_mib"] > 0
            assert 0 < r["uss_mib"] <= r["peak_rss_mib"]
    ratios = doc["ratios"]["by_length"]
    assert [r["length"] for r in ratios] == [64, 128]
    assert all(r["prefill"] > 0 and r["decode"] > 0 for r in ratios)


def test_profile_plot_is_a_png(cli_run):
    _, folder = cli_run
    data = (folder / "out.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_probe_imports_no_torch(tiny_bundles, tmp_path):
    events = tmp_path / "events.jsonl"
    request = {"bundle": str(tiny_bundles["int8"].bundle), "length": 40, "threads": 1, "decode_tokens": 3,
               "time_limit_s": 60, "events": str(events)}
    result = run_python(f"""
        from hydra_edge.profile.probe import run
        run({request!r})
        assert "torch" not in sys.modules
    """, blocked={"torch"})
    assert result.returncode == 0, result.stderr
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert kinds == ["loaded", "prefill_progress", "prefill", "decode", "done"]


def test_slow_prefill_is_a_timeout(transformer_bundle):
    profile = profile_bundle(transformer_bundle, [4096], decode_tokens=2, time_limit_s=0.001)
    result = profile.results[0]
    assert result.status == STATUS_TIMEOUT
    assert 0 < result.prefill_tokens_done < 4096
    assert result.prefill_tps is None
    assert result.decode_state == "filled"
    assert result.decode_tps > 0
    assert "prefill reached" in result.detail
    _, rows, notes = table_rows([profile])
    assert rows[0][-1] == "timeout"
    assert rows[0][2] == "-"
    assert any("decode measured on a context filled" in note for note in notes)


def test_memory_bound_stops_and_skips(transformer_bundle, tmp_path):
    # no Python process with numpy and onnxruntime fits in 20 MiB
    profile = profile_bundle(transformer_bundle, [64, 128], memory_limit_mib=20)
    first, second = profile.results
    assert first.status == STATUS_MEMORY
    assert "resident memory passed 20 MiB" in first.detail
    assert first.prefill_tps is None and first.decode_tps is None
    assert second.status == STATUS_MEMORY
    assert second.detail == "not run: length 64 already exceeded the memory bound"

    plot_profiles([profile], tmp_path / "bounded.png")
    assert (tmp_path / "bounded.png").read_bytes().startswith(PNG_SIGNATURE)


def test_profile_that_measured_nothing_fails(transformer_bundle, tmp_path):
    result = CliRunner().invoke(main, ["profile", str(transformer_bundle), "--lengths", "64", "--memory-limit", "20",
                                       "--json", str(tmp_path / "bounded.json")])
    assert result.exit_code == 1
    assert "transformer-tiny int8 at 64: out of memory bound: resident memory passed 20 MiB" in result.output
    assert "error: no length of transformer-tiny int8 could be measured; the notes above say why" in result.output
    # the results are still written, so the reason can be read later
    assert json.loads((tmp_path / "bounded.json").read_text())["bundles"][0]["results"][0]["status"] == "out of memory bound"


def test_text_tokens_are_fed_when_given(transformer_bundle, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    profile = profile_bundle(transformer_bundle, [100], decode_tokens=2, text=text)
    assert profile.results[0].status == STATUS_OK
    assert profile.results[0].prefill_tokens_done == 100


def test_text_shorter_than_longest_length(transformer_bundle, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("The river rises in the hills.\n")
    with pytest.raises(UsageError, match="fewer than the longest length 4,096; give a longer text or shorter --lengths"):
        profile_bundle(transformer_bundle, [4096], text=text)


@pytest.mark.parametrize(
    "text, expected",
    [("1k,8k,64k", [1024, 8192, 65536]), ("128, 64", [64, 128]), ("2K,2048", [2048]), ("1m", [1 << 20])],
    ids=["suffixes", "plain-unsorted", "duplicates", "million"],
)
def test_parse_lengths(text, expected):
    assert parse_lengths(text) == expected


@pytest.mark.parametrize("text", ["abc", "0", "-1k", "8k,,64k", "1.5k"])
def test_parse_lengths_rejects(text):
    with pytest.raises(UsageError, match="invalid length .* in --lengths; give positive integers"):
        parse_lengths(text)


def test_plot_without_matplotlib_fails_early(transformer_bundle, tmp_path):
    result = run_python(f"""
        from hydra_edge.cli import main
        main(["profile", {str(transformer_bundle)!r}, "--lengths", "64", "--plot", {str(tmp_path / 'p.png')!r}])
    """, blocked={"matplotlib"})
    assert result.returncode == 2
    assert "error: matplotlib is not installed; install hydra-edge[plot] for --plot" in result.stderr
    assert "measuring" not in result.stderr


def test_plot_that_is_not_a_png_fails_early(transformer_bundle, tmp_path):
    result = CliRunner().invoke(main, ["profile", str(transformer_bundle), "--lengths", "64", "--plot",
                                       str(tmp_path / "p.txt")])
    assert result.exit_code == 2
    assert f"error: --plot {tmp_path / 'p.txt'} must name a .png file" in result.output
    assert "prefill" not in result.output  # nothing was measured


def test_profile_of_a_missing_bundle(tmp_path):
    result = CliRunner().invoke(main, ["profile", str(tmp_path / "nowhere"), "--lengths", "64"])
    assert result.exit_code == 1
    assert "is not found; pass the folder written by 'hydra-edge export'" in result.output


def test_transformer_session_rejects_hydra_bundle(tiny_bundles):
    from hydra_edge.runtime.transformer_session import TransformerSession, open_session

    with pytest.raises(BundleError, match="contains a hydra model, not a transformer"):
        TransformerSession(tiny_bundles["int8"].bundle)
    assert type(open_session(tiny_bundles["int8"].bundle)).__name__ == "HydraSession"


def test_uss_flat_for_hydra_only(tiny_bundles, transformer_bundle):
    hydra = profile_bundle(tiny_bundles["int8"].bundle, [256, 4096], decode_tokens=2)
    baseline = profile_bundle(transformer_bundle, [256, 4096], decode_tokens=2)
    hydra_growth = hydra.results[1].uss_mib - hydra.results[0].uss_mib
    baseline_growth = baseline.results[1].uss_mib - baseline.results[0].uss_mib
    # the tiny transformer's cache at 4,096 tokens is 4 layers * 2 * 4 heads * 4096 * 16 * 4 bytes = 8 MiB
    assert hydra_growth < 2.0
    assert baseline_growth > 6.0
    assert np.isfinite([r.prefill_tps for r in hydra.results + baseline.results]).all()
