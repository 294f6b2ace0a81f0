"""hydra-edge export and run from the command line, on a hydra-tiny logic checkpoint."""

import string

import pytest
from click.testing import CliRunner

from conftest import random_hydra
from hydra_edge.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def logic_export(tmp_path_factory):
    """A random hydra-tiny saved as a logic checkpoint, and the CLI result of exporting it with defaults."""
    from hydra_edge.train.checkpoint import save_checkpoint
    from hydra_edge.train.tokenizer import build_logic_tokenizer

    folder = tmp_path_factory.mktemp("cli")
    model = random_hydra("hydra-tiny")
    checkpoint = folder / "model.pt"
    save_checkpoint(checkpoint, model, model.cfg, build_logic_tokenizer(), task="logic", train={"steps": 0})
    return checkpoint, cli("export", checkpoint)


def test_export_writes_the_default_bundle_and_reports_stages(logic_export):
    checkpoint, result = logic_export
    assert result.exit_code == 0, result.output
    bundle = checkpoint.with_name("model-int8")
    assert sorted(p.name for p in bundle.iterdir()) == [
        "head.onnx", "hydra.json", "pkm_scales.bin", "pkm_values.bin", "tail.onnx", "tokenizer.json"]
    for stage in ("trace", "lower", "quantize", "verify", "write"):
        assert f"\n{stage} " in result.output
    assert "top-1 agreement vs float" in result.output
    assert f"wrote {bundle}" in result.output


def test_logic_bundle_prints_one_answer_letter(logic_export):
    checkpoint, _ = logic_export
    result = cli("run", checkpoint.with_name("model-int8"), "--prompt", "A->B.B->C.A->")
    assert result.exit_code == 0, result.output
    assert result.output.strip() in set(string.ascii_uppercase) | {"->", ".", "<eos>", "<bos>", "<pad>", "<unk>"}


def test_export_into_an_existing_folder_needs_force(logic_export):
    checkpoint, _ = logic_export
    bundle = checkpoint.with_name("model-int8")
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    result = cli("export", checkpoint)
    assert result.exit_code == 2
    assert f"error: {bundle} already exists; pass --force to replace it or choose another --out" in result.output
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before


def test_export_with_force_never_replaces_a_regular_file(logic_export):
    checkpoint, _ = logic_export
    target = checkpoint.with_name("notes.txt")
    target.write_text("keep me\n")
    for force in ([], ["--force"]):
        result = cli("export", checkpoint, "--out", target, *force)
        assert result.exit_code == 2
        assert f"error: {target} exists and is not a folder; choose another --out" in result.output
        assert target.read_text() == "keep me\n"


def test_export_of_a_file_that_is_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    result = cli("export", junk)
    assert result.exit_code == 1
    assert result.output.startswith("error: ")
    assert result.output.count("\n") == 1
    assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_pinned_export_needs_calibration_text(logic_export):
    checkpoint, _ = logic_export
    result = cli("export", checkpoint, "--moe", "pinned", "--out", checkpoint.with_name("pinned"))
    assert result.exit_code == 2
    assert "--moe pinned needs --calib TEXT_FILE" in result.output
