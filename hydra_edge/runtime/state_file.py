"""Saving a stream's state to a file and loading it back.

The file is an uncompressed ``.npz`` archive (read with ``allow_pickle=False``,
so loading executes nothing): one array per state tensor, the position, and
the fingerprint of the bundle that wrote it. Loading checks the fingerprint,
every name, shape and dtype before it touches the session.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StateError

STATE_FORMAT = "hydra-edge-state/1"


def bundle_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 over the checksums of the bundle's graphs and PKM table: the model a state belongs to."""
    model_files = {name: entry["sha256"] for name, entry in sorted(manifest["files"].items()) if name != "tokenizer.json"}
    return hashlib.sha256(json.dumps(model_files, sort_keys=True).encode()).hexdigest()


def save_state(path: Path, *, fingerprint: str, pos: int, state: dict[str, np.ndarray]) -> None:
    """Write the state atomically: a temporary file beside ``path``, then a rename."""
    path = Path(path)
    arrays = {f"state/{name}": value for name, value in state.items()}
    arrays["pos"] = np.array(pos, dtype=np.int64)
    arrays["format"] = np.array(STATE_FORMAT)
    arrays["fingerprint"] = np.array(fingerprint)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise StateError(f"cannot write the state file {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StateError(f"cannot write the state file {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: Path, *, fingerprint: str, spec: dict[str, dict]) -> tuple[int, dict[str, np.ndarray]]:
    """Read a state file written for the bundle with ``fingerprint``; return (position, state)."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"state file {path} is {'a folder' if path.is_dir() else 'not found'}; pass a file from --save-state")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise StateError(f"{path} is not a readable state file ({exc.__class__.__name__}); it may be truncated") from None

    if str(arrays.get("format", "")) != STATE_FORMAT:
        raise StateError(f"{path} is not a hydra-edge state file")
    if str(arrays.get("fingerprint", "")) != fingerprint:
        raise StateError(f"{path} was saved from another bundle; resume it with the bundle that wrote it")
    state = {}
    for name, entry in spec.items():
        value = arrays.get(f"state/{name}")
        if value is None:
            raise StateError(f"{path} has no tensor {name}; the file is damaged")
        if list(value.shape) != list(entry["shape"]) or value.dtype != np.dtype(entry["dtype"]):
            raise StateError(
                f"{path}: {name} is {list(value.shape)} {value.dtype}, the bundle needs {entry['shape']} {entry['dtype']}"
            )
        state[name] = value
    pos = int(arrays["pos"])
    if pos < 0:
        raise StateError(f"{path} has a negative position {pos}")
    return pos, state
