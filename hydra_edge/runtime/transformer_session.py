"""Streaming a transformer-baseline bundle with onnxruntime: numpy and onnxruntime only, no torch.

A :class:`TransformerSession` keeps the key/value cache of one stream. Unlike
Hydra's fixed-size state, the cache grows by one position per token: after N
tokens each ``layer{i}.k_cache`` / ``v_cache`` is (1, H, N, P), so memory and
the cost of each call grow with the context. Every call also copies the whole
cache, because the graph returns the cache extended by T positions as a new
tensor (the usual decoder-with-past form, with standard ONNX operators only).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..config import TransformerConfig, config_from_dict
from ..errors import BundleError, UsageError
from .manifest import load_manifest
from .session import HydraSession, session_options
from .state_file import bundle_fingerprint, load_state, save_state

log = logging.getLogger(__name__)

# The graph takes any number of new tokens, but feed() splits longer input
# into calls of at most this many. Longer calls copy the growing cache less
# often, shorter ones keep a call's attention scores small (n_head * T * (S + T)
# floats, 400 MB for 6 heads at T = 256, S = 64K). On transformer-29m int8 at
# 4K tokens, 256 prefilled about 10% faster than 64 or 512, and 1024 was slower.
DEFAULT_MAX_CALL_TOKENS = 256


class TransformerSession:
    """One stream through a transformer bundle: the same feed, step and generate API as HydraSession."""

    def __init__(self, bundle: str | Path, *, threads: int = 1, check_hashes: bool = True,
                 max_call_tokens: int = DEFAULT_MAX_CALL_TOKENS) -> None:
        if max_call_tokens < 1:
            raise UsageError(f"max call tokens must be at least 1, got {max_call_tokens}")
        self.bundle = Path(bundle)
        self.manifest = load_manifest(self.bundle, check_hashes=check_hashes)
        try:
            self._open(threads)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(
                f"{self.bundle / 'hydra.json'} has a missing or invalid entry ({type(exc).__name__}: {exc}); "
                "export the bundle again"
            ) from None
        # feed() splits input into calls of at most ``chunk`` tokens; a step() call may be longer
        self.chunk = max_call_tokens
        self.reset()

    def _open(self, threads: int) -> None:
        cfg = config_from_dict(self.manifest["model"])
        if not isinstance(cfg, TransformerConfig):
            raise BundleError(f"{self.bundle} contains a {cfg.kind} model, not a transformer; "
                             "open it with open_session, which picks the matching session class")
        self.config: TransformerConfig = cfg
        self.vocab_size = cfg.vocab_size

        graph = self.manifest["graphs"]["decoder"]
        path = self.bundle / graph["file"]
        try:
            self._decoder = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"onnxruntime could not load {path}: {exc}") from None
        self._cache_names: list[str] = graph["state"]
        self.state_spec = {s["name"]: s for s in self.manifest["state"]}
        self._check_state_spec()

    def _check_state_spec(self) -> None:
        """Check the manifest's cache tensors against the graph's inputs: an edited manifest fails here."""
        inputs = {i.name: i for i in self._decoder.get_inputs()}
        for name in self._cache_names:
            spec = self.state_spec.get(name)
            graph_input = inputs.get(name)
            if spec is None or graph_input is None:
                raise BundleError(f"cache tensor {name} is missing from the manifest or the graph of {self.bundle}; "
                                  "export the bundle again")
            if list(graph_input.shape) != list(spec["shape"]) or spec["dtype"] != "float32":
                raise BundleError(
                    f"{self.bundle / 'hydra.json'} gives {name} shape {spec['shape']} {spec['dtype']} but the graph "
                    f"takes {list(graph_input.shape)} float32; the manifest was edited, export the bundle again"
                )

    # -- state --------------------------------------------------------------

    def _spec_at(self, length: int) -> dict[str, dict]:
        """Return the state spec with the cache axis ``"S"`` set to ``length``."""
        return {
            name: {**spec, "shape": [length if dim == "S" else dim for dim in spec["shape"]]}
            for name, spec in self.state_spec.items()
        }

    def reset(self) -> None:
        """Start a new stream: position 0 and an empty cache."""
        self.pos = 0
        self.state = {name: np.zeros(spec["shape"], dtype=spec["dtype"]) for name, spec in self._spec_at(0).items()}

    @property
    def cache_bytes(self) -> int:
        """Size of the key/value cache in bytes, which grows linearly with ``pos``."""
        return sum(value.nbytes for value in self.state.values())

    # -- feeding ------------------------------------------------------------

    # the checks and the sampling loop are HydraSession's: they only use vocab_size and feed()
    _check_tokens = HydraSession._check_tokens
    generate = HydraSession.generate

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Run any number (at least 1) of new tokens in one call; return logits (T, V)."""
        t = len(tokens)
        if t < 1:
            raise UsageError("a call takes at least 1 token, got 0")
        feed = {"tokens": np.asarray(tokens, dtype=np.int64).reshape(1, t), "pos": np.array(self.pos, dtype=np.int64)}
        feed.update({n: self.state[n] for n in self._cache_names})
        logits, *caches = self._decoder.run(None, feed)
        self.state = dict(zip(self._cache_names, caches))
        self.pos += t
        return logits[0]

    def feed(self, tokens, *, all_logits: bool = False) -> np.ndarray:
        """Feed any number of tokens in calls of at most ``chunk``; return the last logits (V,) or all (N, V)."""
        arr = self._check_tokens(tokens)
        outputs = []
        for start in range(0, arr.size, self.chunk):
            logits = self.step(arr[start:start + self.chunk])
            # copy the last row: a view would keep every call's (T, V) logits alive until the end
            outputs.append(logits if all_logits else logits[-1:].copy())
        return np.concatenate(outputs) if all_logits else outputs[-1][-1]

    # -- saving and resuming ------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return bundle_fingerprint(self.manifest)

    def save_state(self, path: str | Path) -> None:
        """Write the position and the cache to ``path`` (atomically); the file grows with the context."""
        save_state(Path(path), fingerprint=self.fingerprint, pos=self.pos, state=self.state)

    def load_state(self, path: str | Path) -> None:
        """Continue the stream saved in ``path``; raise StateError if it belongs to another bundle."""
        # the cache length equals the saved position, so the expected shapes depend on it
        spec = self._spec_at(_saved_position(Path(path)))
        self.pos, self.state = load_state(Path(path), fingerprint=self.fingerprint, spec=spec)


def _saved_position(path: Path) -> int:
    """Read the ``pos`` entry of a state file; return 0 when it cannot be read, and ``load_state`` reports why."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return max(int(archive["pos"]), 0)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, TypeError):
        return 0


def open_session(bundle: str | Path, threads: int = 1, check_hashes: bool = True):
    """Open a bundle with the session class of its model kind: HydraSession or TransformerSession."""
    manifest = load_manifest(Path(bundle), check_hashes=False)
    model = manifest.get("model")
    kind = model.get("kind", "hydra") if isinstance(model, dict) else None
    if kind == "transformer":
        return TransformerSession(bundle, threads=threads, check_hashes=check_hashes)
    if kind == "hydra":
        return HydraSession(bundle, threads=threads, check_hashes=check_hashes)
    raise BundleError(f"{Path(bundle) / 'hydra.json'} names model kind {kind!r}; expected 'hydra' or 'transformer'")
