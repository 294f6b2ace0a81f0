"""Every command against bad input and faults: one error line, the right exit code, nothing lost."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TOKENIZER_JSON, random_hydra
from hydra_edge.cli import main
from hydra_edge.errors import BundleError, HydraEdgeError, StateError
from hydra_edge.runtime import HydraSession


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(result, exit_code, words):
    assert result.exit_code == exit_code, result.output
    assert result.output.startswith("error: ") or "Error:" in result.output, result.output
    assert words in result.output
    assert "Traceback" not in result.output


@pytest.fixture
def bundle_copy(tiny_bundles, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["int8"].bundle, dst)
    return dst


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- run: numeric options -----------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--threads", "0", "Invalid value for '--threads'"),
        ("--threads", "-3", "Invalid value for '--threads'"),
        ("--max-new-tokens", "-1", "Invalid value for '--max-new-tokens'"),
        ("--top-k", "-5", "Invalid value for '--top-k'"),
        ("--temperature", "-1", "temperature must be 0 (greedy) or a finite positive number, got -1.0"),
        ("--temperature", "nan", "temperature must be 0 (greedy) or a finite positive number, got nan"),
        ("--temperature", "1e309", "temperature must be 0 (greedy) or a finite positive number, got inf"),
        ("--seed", "-1", "Invalid value for '--seed'"),
        ("--top-p", "0", "top-p must be in (0, 1], got 0.0"),
        ("--top-p", "1.5", "top-p must be in (0, 1], got 1.5"),
        ("--threads", "many", "Invalid value for '--threads'"),
    ],
)
def test_run_rejects_invalid_numbers(tiny_bundles, option, value, words):
    result = cli("run", tiny_bundles["int8"].bundle, "--prompt", "The river", option, value)
    assert_one_error_line(result, 2, words)


def test_run_with_huge_thread_count_still_runs(tiny_bundles):
    result = cli("run", tiny_bundles["int8"].bundle, "--prompt", "The river", "--threads", "4096", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output


def test_run_file_that_is_missing_or_a_folder(tiny_bundles, tmp_path):
    missing = cli("run", tiny_bundles["int8"].bundle, "--file", tmp_path / "none.txt")
    assert_one_error_line(missing, 2, "none.txt is not found; give a UTF-8 text file")
    folder = cli("run", tiny_bundles["int8"].bundle, "--file", tmp_path)
    assert_one_error_line(folder, 2, f"--file {tmp_path} is a folder")
    state = cli("run", tiny_bundles["int8"].bundle, "--prompt", "x", "--save-state", tmp_path)
    assert_one_error_line(state, 2, f"--save-state {tmp_path} is a folder; give a file path")
    missing = cli("run", tiny_bundles["int8"].bundle, "--prompt", "x", "--save-state", tmp_path / "no" / "s.npz")
    assert_one_error_line(missing, 2, f"folder {tmp_path / 'no'} of --save-state does not exist; create it first")


def test_run_needs_exactly_one_input(tiny_bundles, tmp_path):
    both = cli("run", tiny_bundles["int8"].bundle, "--prompt", "x", "--file", tmp_path / "a.txt")
    assert_one_error_line(both, 2, "give exactly one of --prompt TEXT or --file PATH")
    neither = cli("run", tiny_bundles["int8"].bundle)
    assert_one_error_line(neither, 2, "give exactly one of --prompt TEXT or --file PATH")


# -- run: bundle paths -------------------------------------------------------------


def test_run_on_missing_empty_and_foreign_bundles(tmp_path):
    assert_one_error_line(cli("run", tmp_path / "nowhere", "--prompt", "x"), 1, "nowhere is not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_error_line(cli("run", empty, "--prompt", "x"), 1, "hydra.json is missing")
    a_file = tmp_path / "file.onnx"
    a_file.write_bytes(b"\x08\x01")
    assert_one_error_line(cli("run", a_file, "--prompt", "x"), 1, "file.onnx is a file, not a bundle folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "hydra.json").write_text('{"name": "something else"}')
    assert_one_error_line(cli("run", foreign, "--prompt", "x"), 1, "is not a hydra-edge manifest")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "hydra.json").write_bytes(os.urandom(64) + b"\xff")
    assert_one_error_line(cli("run", binary, "--prompt", "x"), 1, "is not valid JSON")


def test_manifest_with_wrong_state_shape(bundle_copy):
    manifest = json.loads((bundle_copy / "hydra.json").read_text())
    manifest["state"][1]["shape"][1] += 1
    (bundle_copy / "hydra.json").write_text(json.dumps(manifest))
    name = manifest["state"][1]["name"]
    result = cli("run", bundle_copy, "--prompt", "The river")
    assert_one_error_line(result, 1, f"gives {name} shape")
    assert "the manifest was edited, export the bundle again" in result.output


def test_manifest_without_graphs_entry(bundle_copy):
    manifest = json.loads((bundle_copy / "hydra.json").read_text())
    del manifest["graphs"]
    (bundle_copy / "hydra.json").write_text(json.dumps(manifest))
    assert_one_error_line(cli("run", bundle_copy, "--prompt", "x"), 1, "has a missing or invalid entry (KeyError: 'graphs')")


def test_skip_hash_check_still_checks_presence_and_size(bundle_copy):
    data = bytearray((bundle_copy / "tail.onnx").read_bytes())
    (bundle_copy / "tail.onnx").write_bytes(bytes(data[:-10]))
    result = cli("run", bundle_copy, "--prompt", "x", "--skip-hash-check")
    assert_one_error_line(result, 1, "but the manifest says")


def test_state_saved_into_a_read_only_folder(tiny_bundles, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write to read-only folders (root)")
        result = cli("run", tiny_bundles["int8"].bundle, "--prompt", "The", "--max-new-tokens", "1",
                     "--save-state", locked / "s.npz")
        assert_one_error_line(result, 1, "cannot write the state file")
    finally:
        locked.chmod(0o700)


def test_state_file_on_a_full_disk(tiny_bundles, tmp_path, monkeypatch):
    session = HydraSession(tiny_bundles["int8"].bundle)
    session.feed([1, 2, 3])

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", no_space)
    with pytest.raises(StateError, match="cannot write the state file .*: No space left on device"):
        session.save_state(tmp_path / "s.npz")
    assert list(tmp_path.iterdir()) == []


# -- export: paths, options, faults ----------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from hydra_edge.train.checkpoint import save_checkpoint
    from hydra_edge.train.tokenizer import build_logic_tokenizer

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    model = random_hydra("hydra-tiny")
    save_checkpoint(path, model, model.cfg, build_logic_tokenizer(), task="logic", train={})
    return path


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["--opset", "0"], 2, "--opset must be between 18 and 21, got 0"),
        (["--opset", "999"], 2, "--opset must be between 18 and 21, got 999"),
        (["--pin-mass", "0", "--moe", "pinned", "--calib", "x"], 2, "--pin-mass must be in (0, 1], got 0.0"),
        (["--pin-mass", "7", "--moe", "pinned", "--calib", "x"], 2, "--pin-mass must be in (0, 1], got 7.0"),
        (["--quantize", "int4"], 2, "Invalid value for '--quantize'"),
        (["--moe", "random"], 2, "Invalid value for '--moe'"),
        (["--calib", "x"], 2, "--calib is only read by --moe pinned; add --moe pinned or drop --calib"),
        (["--pin-mass", "0.5"], 2, "--pin-mass is only read by --moe pinned; add --moe pinned or drop --pin-mass"),
    ],
)
def test_export_rejects_invalid_options(checkpoint, tmp_path, args, code, words):
    result = cli("export", checkpoint, "--out", tmp_path / "b", *args)
    assert_one_error_line(result, code, words)
    assert not (tmp_path / "b").exists()


def test_export_checkpoint_paths(tmp_path):
    assert_one_error_line(cli("export", tmp_path / "none.pt"), 1, "none.pt")
    assert_one_error_line(cli("export", tmp_path), 1, str(tmp_path))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_one_error_line(cli("export", empty), 1, "empty.pt")


def test_export_into_a_missing_or_read_only_parent(checkpoint, tmp_path):
    result = cli("export", checkpoint, "--out", tmp_path / "no" / "such" / "bundle")
    assert_one_error_line(result, 2, f"folder {tmp_path / 'no' / 'such'} of --out does not exist; create it")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write to read-only folders (root)")
        assert_one_error_line(cli("export", checkpoint, "--out", locked / "b"), 2, "cannot write to")
    finally:
        locked.chmod(0o700)


def test_export_into_a_folder_it_may_not_write(checkpoint, tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    # simulated, because root (as in CI) may write to read-only folders
    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    result = cli("export", checkpoint, "--out", tmp_path / "b")
    assert_one_error_line(result, 1, f"cannot write the bundle in {tmp_path}: Permission denied")
    assert list(tmp_path.iterdir()) == []


def test_export_with_unusable_calibration_text(checkpoint, tmp_path):
    binary = tmp_path / "calib.bin"
    binary.write_bytes(b"\xff\xfe\x00\x01" * 10)
    result = cli("export", checkpoint, "--out", tmp_path / "b", "--moe", "pinned", "--calib", binary)
    assert_one_error_line(result, 2, "is not UTF-8 text")
    result = cli("export", checkpoint, "--out", tmp_path / "b", "--moe", "pinned", "--calib", tmp_path / "none.txt")
    assert_one_error_line(result, 2, "none.txt is not found; give a UTF-8 text file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.bin"]


def test_export_on_a_full_disk_leaves_nothing_and_keeps_the_old_bundle(tiny_bundles, tmp_path, monkeypatch):
    import onnx

    from hydra_edge.errors import ExportError
    from hydra_edge.export.bundle import ExportOptions, export_model

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["int8"].bundle, out)
    before = snapshot(out)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save", no_space)
    with pytest.raises(ExportError, match="cannot write the bundle in .*: No space left on device; free some space"):
        export_model(tiny_bundles["model"], TOKENIZER_JSON, out, ExportOptions(force=True))
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_export_leaves_no_partial_bundle(checkpoint, tiny_bundles, tmp_path, sig):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["int8"].bundle, out)
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, "-m", "hydra_edge.cli", "export", str(checkpoint), "--out", str(out),
                             "--force"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # wait until the export has created its temporary folder, then interrupt it
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob(".bundle.tmp-*")):
        time.sleep(0.2)
    assert list(tmp_path.glob(".bundle.tmp-*")), "the export never started"
    time.sleep(1.0)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert snapshot(out) == before


def test_killed_export_leftovers_are_removed_by_the_next_export(tiny_bundles, tmp_path):
    from hydra_edge.export.bundle import ExportOptions, export_model

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".bundle.tmp-{dead.stdout.strip()}-abc123"
    leftover.mkdir()
    (leftover / "head.onnx").write_bytes(b"partial")
    export_model(tiny_bundles["model"], TOKENIZER_JSON, tmp_path / "bundle", ExportOptions(verify_tokens=20))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


# -- property-based: the loaders only succeed or raise our own errors --------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
))
def test_any_manifest_json_gives_success_or_bundle_error(tiny_bundles, tmp_path_factory, manifest):
    folder = tmp_path_factory.mktemp("fuzz")
    for name in ("head.onnx", "tail.onnx", "pkm_values.bin", "pkm_scales.bin", "tokenizer.json"):
        shutil.copy(tiny_bundles["int8"].bundle / name, folder / name)
    (folder / "hydra.json").write_text(json.dumps(manifest))
    try:
        HydraSession(folder)
    except HydraEdgeError as exc:
        assert str(exc)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=st.sampled_from(["format", "version", "shape", "fingerprint", "drop"]), value=st.text(max_size=30))
def test_any_manifest_edit_gives_bundle_error(tiny_bundles, bundle_copy, mutation, value):
    manifest = json.loads((tiny_bundles["int8"].bundle / "hydra.json").read_text())
    if mutation == "format":
        manifest["format"] = value
    elif mutation == "version":
        manifest["format_version"] = value
    elif mutation == "shape":
        manifest["state"][0]["shape"] = [value]
    elif mutation == "fingerprint":
        manifest["files"]["head.onnx"]["sha256"] = value
    else:
        manifest["pkm"].pop("values")
    (bundle_copy / "hydra.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError):
        HydraSession(bundle_copy)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_any_state_file_bytes_give_success_or_state_error(tiny_bundles, tmp_path_factory, data):
    session = HydraSession(tiny_bundles["int8"].bundle, check_hashes=False)
    path = tmp_path_factory.mktemp("state") / "s.npz"
    path.write_bytes(data)
    with pytest.raises(StateError):
        session.load_state(path)
    assert session.pos == 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_any_unicode_prompt_generates_or_gives_a_usage_error(tiny_bundles, text):
    result = cli("run", tiny_bundles["int8"].bundle, "--prompt", text, "--max-new-tokens", "2", "--skip-hash-check")
    if text.strip():
        assert result.exit_code == 0, result.output
    else:
        assert_one_error_line(result, 2, "--prompt is empty")
