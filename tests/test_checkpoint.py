"""Checkpoint loading: every kind of bad file raises CheckpointError, and the CLI prints one line."""

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hydra_edge.cli import main
from hydra_edge.config import config_to_dict, get_preset
from hydra_edge.errors import CheckpointError
from hydra_edge.model import build_model
from hydra_edge.train.checkpoint import load_checkpoint, save_checkpoint
from hydra_edge.train.tokenizer import build_logic_tokenizer

HINT = "pass a checkpoint written by 'hydra-edge train'"


class RunsShellCommand:
    """Pickles to a call of os.system, as a malicious checkpoint would."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "model.pt"
    torch.manual_seed(0)
    cfg = get_preset("hydra-tiny")
    save_checkpoint(path, build_model(cfg), cfg, build_logic_tokenizer(), task="logic", train={"steps": 0})
    return path


def edited(good: Path, out: Path, edit) -> Path:
    """Save a copy of the good checkpoint's dict after ``edit`` changed it in place."""
    data = torch.load(good, weights_only=True)
    edit(data)
    torch.save(data, out)
    return out


def other_preset_config(data):
    data["config"] = config_to_dict(get_preset("hydra-29m"))


def drop_tensor(data):
    del data["state_dict"]["pkm.values"]


def add_tensor(data):
    data["state_dict"]["extra.weight"] = torch.zeros(3)


def reshape_tensor(data):
    data["state_dict"]["embed.weight"] = torch.zeros(3, 64)


def transformer_config(data):
    data["config"] = config_to_dict(get_preset("transformer-tiny"))


def make_bad_file(case: str, tmp_path: Path, good: Path) -> Path:
    path = tmp_path / f"{case}.pt"
    if case == "missing":
        return path
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "random-bytes":
        path.write_bytes(bytes(range(7, 256)) * 16)
    elif case == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "text":
        path.write_text("over and out\n")
    elif case == "shell-command-pickle":
        torch.save({"format": "hydra-edge-checkpoint", "x": RunsShellCommand(f"touch {tmp_path / 'ran'}")}, path)
    elif case == "raw-pickle":
        path.write_bytes(pickle.dumps(RunsShellCommand(f"touch {tmp_path / 'ran'}")))
    elif case == "plain-list":
        torch.save([1, 2, 3], path)
    elif case == "bare-state-dict":
        torch.save(build_model(get_preset("hydra-tiny")).state_dict(), path)
    elif case == "future-version":
        edited(good, path, lambda d: d.update(version=2))
    elif case == "no-state-dict":
        edited(good, path, lambda d: d.pop("state_dict"))
    elif case == "other-preset":
        edited(good, path, other_preset_config)
    elif case == "transformer-config":
        edited(good, path, transformer_config)
    elif case == "missing-tensor":
        edited(good, path, drop_tensor)
    elif case == "unexpected-tensor":
        edited(good, path, add_tensor)
    elif case == "wrong-shape":
        edited(good, path, reshape_tensor)
    elif case == "unknown-config-field":
        edited(good, path, lambda d: d["config"].update(bogus=1))
    elif case == "bad-tokenizer":
        edited(good, path, lambda d: d.update(tokenizer="{not json"))
    elif case == "unknown-task":
        edited(good, path, lambda d: d.update(task="vision"))
    else:
        raise ValueError(case)
    return path


# case -> the message after "checkpoint {path} " (or "{path} ")
CASES = {
    "missing": f"not found; {HINT}",
    "directory": f"path {{path}} is not a file; {HINT}",
    "empty": f"is empty; {HINT}",
    # the reason in brackets is torch's own message, which differs between torch versions
    "random-bytes": "is damaged or not a torch file (",
    "truncated": "is damaged or not a torch file (RuntimeError: PytorchStreamReader failed reading zip archive",
    "text": "is damaged or not a torch file (",
    "shell-command-pickle": "contains objects other than tensors and plain types (Trying to load unsupported "
                            f"GLOBAL posix.system whose module posix is blocked), which are never loaded; {HINT}",
    # protocol 4 framing is rejected before the call to os.system is reached
    "raw-pickle": "is damaged or not a torch file (",
    "plain-list": f"is not a hydra-edge checkpoint (no format marker 'hydra-edge-checkpoint'); {HINT}",
    "bare-state-dict": f"is not a hydra-edge checkpoint (no format marker 'hydra-edge-checkpoint'); {HINT}",
    "future-version": "has format version 2 but this hydra-edge reads version 1; retrain it",
    "no-state-dict": f"has no valid 'state_dict' entry (expected a dict); {HINT}",
    "other-preset": "does not match its config 'hydra-29m': 56 missing tensors (first: blocks.4.norm.weight); "
                    "2 unexpected entries (first: blocks.1.sga.qkv.weight); "
                    "embed.weight has shape (512, 64), expected (8192, 384)",
    "transformer-config": "does not match its config 'transformer-tiny': ",
    "missing-tensor": "does not match its config 'hydra-tiny': 1 missing tensors (first: pkm.values)",
    "unexpected-tensor": "does not match its config 'hydra-tiny': 1 unexpected entries (first: extra.weight)",
    "wrong-shape": "does not match its config 'hydra-tiny': embed.weight has shape (3, 64), expected (512, 64)",
    "unknown-config-field": f"has an invalid model config (unknown hydra config fields: bogus); {HINT}",
    "bad-tokenizer": "has an invalid tokenizer (",
    "unknown-task": f"names unknown task 'vision'; {HINT}",
}


def expected_message(case: str, path: Path) -> str:
    message = CASES[case]
    if "{path}" in message:
        return "checkpoint " + message.format(path=path)
    if message.startswith("is not a hydra-edge"):
        return f"{path} {message}"
    return f"checkpoint {path} {message}"


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_raises(tmp_path, good_checkpoint, case):
    path = make_bad_file(case, tmp_path, good_checkpoint)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(expected_message(case, path))
    assert message.endswith("; retrain it or use the matching hydra-edge release" if case == "future-version" else HINT)
    assert "\n" not in message
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("case", CASES)
def test_cli_info_bad_checkpoint_one_line(tmp_path, good_checkpoint, case):
    path = make_bad_file(case, tmp_path, good_checkpoint)
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: " + expected_message(case, path))
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ran").exists()


def test_shell_command_pickle_runs_nothing_in_subprocess(tmp_path):
    """The real console script, not CliRunner: nothing runs and only one line is printed."""
    import subprocess
    import sys

    path = make_bad_file("shell-command-pickle", tmp_path, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "hydra_edge.cli", "info", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert re.fullmatch(r"error: checkpoint .* contains objects other than tensors and plain types "
                        r"\(.*posix.system.*\), which are never loaded; .*\n", proc.stderr)
    assert not (tmp_path / "ran").exists()


def test_good_checkpoint_loads(good_checkpoint):
    model, cfg, tokenizer, meta = load_checkpoint(good_checkpoint)
    assert cfg == get_preset("hydra-tiny")
    assert not model.training
    assert meta == {"task": "logic", "train": {"steps": 0}}
    assert tokenizer.get_vocab_size() == 32
