"""Checkpoints: the model config, weights, tokenizer and training record in one file.

A checkpoint is a dict written with ``torch.save`` that contains only plain
Python types and tensors, so ``torch.load(path, weights_only=True)`` reads it
and nothing in it runs on load::

    {"format": "hydra-edge-checkpoint", "version": 1,
     "config": config_to_dict(cfg), "state_dict": {name: tensor},
     "tokenizer": tokenizer.json as a string, "task": "logic" | "text",
     "train": {"steps": ..., "final_loss": ..., "eval": {...}, ...}}
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import warnings
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from ..config import ModelConfig, config_from_dict, config_to_dict
from ..errors import CheckpointError, UsageError
from ..model import build_model
from .options import TASKS

log = logging.getLogger(__name__)

FORMAT = "hydra-edge-checkpoint"
VERSION = 1
RETRAIN_HINT = "pass a checkpoint written by 'hydra-edge train'"


def check_output_path(path: str | Path) -> None:
    """Raise UsageError if a checkpoint cannot be written to ``path``; call it before training starts."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise UsageError(f"output path {path} is a directory; pass a file name such as {path / 'model.pt'}")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist; create it or choose another --out")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output folder {parent} is not writable; choose another --out")


def save_checkpoint(
    path: str | Path, model: nn.Module, cfg: ModelConfig, tokenizer: Tokenizer, *, task: str, train: dict[str, Any]
) -> None:
    """Write a checkpoint atomically: a temporary file in the same folder, then ``os.replace``.

    A failure at any point leaves an earlier file at ``path`` untouched and
    removes the temporary file. ``train`` must contain only plain types.
    """
    path = Path(path)
    check_output_path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config_to_dict(cfg),
        "state_dict": {name: t.detach().cpu() for name, t in model.state_dict().items()},
        "tokenizer": tokenizer.to_str(),
        "task": task,
        "train": train,
    }
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("saved checkpoint %s", path)


def _read_file(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found; {RETRAIN_HINT}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path {path} is not a file; {RETRAIN_HINT}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty; {RETRAIN_HINT}")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of files it then reads or rejects anyway
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, weights_only=True, map_location="cpu")
    # torch.load raises many unrelated types (IndexError, KeyError, EOFError,
    # RuntimeError, UnpicklingError...) on bytes that are not a torch file, so catch them all here
    except Exception as exc:
        reason = _load_failure_reason(exc)
        # torch 2.13 names the class or callable that weights_only refused to import
        if "unsupported GLOBAL" in reason or "Unsupported global" in reason:
            raise CheckpointError(
                f"checkpoint {path} contains objects other than tensors and plain types ({reason}), "
                f"which are never loaded; {RETRAIN_HINT}"
            ) from None
        raise CheckpointError(f"checkpoint {path} is damaged or not a torch file ({reason}); {RETRAIN_HINT}") from None


def _load_failure_reason(exc: Exception) -> str:
    """Return the informative line of a torch.load error, without torch's advice on weights_only=False."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, pickle.UnpicklingError) and lines and lines[0].startswith("Weights only load failed"):
        # the detail sits between torch's first paragraph and its pointer to the documentation
        skip = ("Check the documentation", "Please file an issue")
        details = [line for line in lines[1:] if not line.startswith(skip)]
        return details[0].rstrip(".")[:160] if details else "rejected by the weights-only unpickler"
    return f"{type(exc).__name__}: {_first_line(exc)}" if lines else type(exc).__name__


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else type(exc).__name__


def _check_entries(path: Path, data: Any) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a hydra-edge checkpoint (no format marker {FORMAT!r}); {RETRAIN_HINT}")
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {data.get('version')!r} but this hydra-edge reads "
            f"version {VERSION}; retrain it or use the matching hydra-edge release"
        )
    expected = {"config": dict, "state_dict": dict, "tokenizer": str, "task": str, "train": dict}
    for key, kind in expected.items():
        if not isinstance(data.get(key), kind):
            raise CheckpointError(f"checkpoint {path} has no valid {key!r} entry (expected a {kind.__name__}); {RETRAIN_HINT}")
    if data["task"] not in TASKS:
        raise CheckpointError(f"checkpoint {path} names unknown task {data['task']!r}; {RETRAIN_HINT}")


def _check_state_dict(path: Path, model: nn.Module, cfg: ModelConfig, state_dict: dict) -> None:
    """Raise CheckpointError naming the first missing, unexpected or misshaped tensor."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected entries (first: {unexpected[0]})")
    for name, tensor in expected.items():
        value = state_dict.get(name)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name} is a {type(value).__name__}, not a tensor")
            break
        if value.shape != tensor.shape:
            problems.append(f"{name} has shape {tuple(value.shape)}, expected {tuple(tensor.shape)}")
            break
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match its config {cfg.name!r}: {'; '.join(problems)}; {RETRAIN_HINT}"
        )


def load_checkpoint(path: str | Path) -> tuple[nn.Module, ModelConfig, Tokenizer, dict[str, Any]]:
    """Load a checkpoint: return the model in eval mode, its config, the tokenizer and the metadata.

    The metadata is {"task": ..., "train": ...} as saved. Raise CheckpointError
    with one line for a missing, empty, damaged, unsafe or foreign file and for
    weights that do not fit the stored config.
    """
    path = Path(path)
    data = _read_file(path)
    _check_entries(path, data)

    try:
        cfg = config_from_dict(data["config"])
    except UsageError as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid model config ({exc}); {RETRAIN_HINT}") from None
    model = build_model(cfg)
    _check_state_dict(path, model, cfg, data["state_dict"])
    model.load_state_dict(data["state_dict"])
    model.eval()

    # the Rust side reports every parse failure as a plain Exception
    try:
        tokenizer = Tokenizer.from_str(data["tokenizer"])
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid tokenizer ({_first_line(exc)}); {RETRAIN_HINT}") from None
    if tokenizer.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
        raise CheckpointError(
            f"checkpoint {path} has a tokenizer of {tokenizer.get_vocab_size()} tokens for a model "
            f"with vocab_size {cfg.vocab_size}; {RETRAIN_HINT}"
        )
    return model, cfg, tokenizer, {"task": data["task"], "train": data["train"]}
