"""Reading and checking a bundle's manifest, ``hydra.json``.

Checks run in this order: the manifest parses and has our format and a
version we support; every listed file exists with the listed size; and,
unless the caller skips it, every file's sha256 matches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import BundleError

MANIFEST_NAME = "hydra.json"
BUNDLE_FORMAT = "hydra-edge-bundle"
FORMAT_VERSION = 1
DTYPE_SIZES = {"int8": 1, "float32": 4, "int64": 8}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(bundle: Path, *, check_hashes: bool = True) -> dict[str, Any]:
    """Load ``bundle/hydra.json`` and check the files it lists; raise BundleError naming the problem."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        what = "is a file, not a bundle folder" if bundle.exists() else "is not found"
        raise BundleError(f"bundle folder {bundle} {what}; pass the folder written by 'hydra-edge export'")
    if not path.is_file():
        raise BundleError(f"{path} is missing; {bundle} is not a hydra-edge bundle (export one with 'hydra-edge export')")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); export the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a hydra-edge manifest (format is not {BUNDLE_FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{path} has format version {version}, newer than the {FORMAT_VERSION} this hydra-edge reads; "
            "upgrade hydra-edge or export the bundle with this version"
        )

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path} lists no files; export the bundle again")
    for name, entry in files.items():
        file = bundle / name
        if not isinstance(entry, dict):
            raise BundleError(f"{path} has an invalid entry for {name!r}; export the bundle again")
        if Path(name).name != name:
            raise BundleError(f"{path} lists {name!r}, which is not a plain file name")
        if not file.is_file():
            raise BundleError(f"{file} is missing from the bundle; export the bundle again")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise BundleError(f"{file} has {size} bytes but the manifest says {entry.get('bytes')}; the bundle is damaged, export it again")
        if check_hashes and sha256_file(file) != entry.get("sha256"):
            raise BundleError(f"{file} does not match its sha256 in the manifest; the file was altered, export the bundle again")
    return manifest


def check_array_file(bundle: Path, spec: dict[str, Any]) -> None:
    """Check that a raw array file has exactly the bytes its shape and dtype need."""
    file = Path(bundle) / spec["file"]
    if not file.is_file():
        raise BundleError(f"{file} is missing from the bundle; export the bundle again")
    expected = DTYPE_SIZES[spec["dtype"]]
    for dim in spec["shape"]:
        expected *= dim
    size = file.stat().st_size
    if size != expected:
        raise BundleError(
            f"{file} has {size} bytes but shape {spec['shape']} of {spec['dtype']} needs {expected}; export the bundle again"
        )
