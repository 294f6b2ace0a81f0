"""Streaming a Hydra bundle with onnxruntime: numpy and onnxruntime only, no torch.

A :class:`HydraSession` keeps the fixed-size state of one stream. ``feed``
splits any number of tokens into calls that end at or before a chunk
boundary, runs the head graph, reads the PKM rows from the memory-mapped
table, runs the tail graph and keeps the new state.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort

from ..config import HydraConfig, config_from_dict
from ..errors import BundleError, UsageError
from .manifest import check_array_file, load_manifest
from .sampling import SamplingOptions, sample_token
from .state_file import bundle_fingerprint, load_state, save_state

log = logging.getLogger(__name__)


def session_options(threads: int) -> ort.SessionOptions:
    if threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    cores = os.cpu_count() or 1
    if threads > cores:
        # more threads than cores only adds contention, and thousands of them take minutes to start
        log.warning("using %d threads, the number of CPU cores, instead of the %d requested", cores, threads)
        threads = cores
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Without this, onnxruntime 1.32 fuses a weight stored int8 before a float MatMul
    # (quantize.int8.WEIGHT_ONLY) into MatMulNBits, which quantizes the activations to int8
    # on x86-64 but not on aarch64. With it, the weight is dequantized once at load.
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return opts


class HydraSession:
    """One stream through a bundle: load, feed tokens, read logits, save and resume state."""

    def __init__(self, bundle: str | Path, *, threads: int = 1, check_hashes: bool = True) -> None:
        self.bundle = Path(bundle)
        self.manifest = load_manifest(self.bundle, check_hashes=check_hashes)
        try:
            self._open(threads)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(
                f"{self.bundle / 'hydra.json'} has a missing or invalid entry ({type(exc).__name__}: {exc}); "
                "export the bundle again"
            ) from None
        self.reset()

    def _open(self, threads: int) -> None:
        try:
            cfg = config_from_dict(self.manifest["model"])
        except UsageError as exc:
            raise BundleError(f"{self.bundle / 'hydra.json'}: {exc}; export the bundle again") from None
        if not isinstance(cfg, HydraConfig):
            raise BundleError(f"{self.bundle} contains a {cfg.kind} model, not a Hydra model; open it with the matching session class")
        self.config: HydraConfig = cfg
        self.chunk = cfg.chunk
        self.vocab_size = cfg.vocab_size

        # graphs
        opts = session_options(threads)
        graphs = self.manifest["graphs"]
        self._head = self._open_graph(graphs["head"]["file"], opts)
        self._tail = self._open_graph(graphs["tail"]["file"], opts)
        self._head_states = graphs["head"]["state"]
        self._tail_states = graphs["tail"]["state"]

        # the PKM table stays on disk: only the rows a token reads are paged in
        pkm = self.manifest["pkm"]
        check_array_file(self.bundle, pkm["values"])
        self._pkm_values = np.memmap(self.bundle / pkm["values"]["file"], dtype=pkm["values"]["dtype"],
                                     mode="r", shape=tuple(pkm["values"]["shape"]))
        self._pkm_scales = None
        if "scales" in pkm:
            check_array_file(self.bundle, pkm["scales"])
            self._pkm_scales = np.memmap(self.bundle / pkm["scales"]["file"], dtype=pkm["scales"]["dtype"],
                                         mode="r", shape=tuple(pkm["scales"]["shape"]))
        self.state_spec = {s["name"]: s for s in self.manifest["state"]}
        self._check_state_spec()

    def _check_state_spec(self) -> None:
        """Check the manifest's state tensors against the graphs' inputs: an edited manifest fails here."""
        inputs = {i.name: i for graph in (self._head, self._tail) for i in graph.get_inputs()}
        for name in self._head_states + self._tail_states:
            spec = self.state_spec.get(name)
            graph_input = inputs.get(name)
            if spec is None or graph_input is None:
                raise BundleError(f"state tensor {name} is missing from the manifest or the graphs of {self.bundle}; "
                                  "export the bundle again")
            if list(graph_input.shape) != list(spec["shape"]) or spec["dtype"] != "float32":
                raise BundleError(
                    f"{self.bundle / 'hydra.json'} gives {name} shape {spec['shape']} {spec['dtype']} but the graph "
                    f"takes {list(graph_input.shape)} float32; the manifest was edited, export the bundle again"
                )

    def _open_graph(self, name: str, opts: ort.SessionOptions) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(self.bundle / name), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"onnxruntime could not load {self.bundle / name}: {exc}") from None

    # -- state --------------------------------------------------------------

    def reset(self) -> None:
        """Start a new stream: position 0 and an all-zero state."""
        self.pos = 0
        self.state = {
            name: np.zeros(spec["shape"], dtype=spec["dtype"]) for name, spec in self.state_spec.items()
        }

    # -- feeding ------------------------------------------------------------

    def _check_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.size == 0:
            raise UsageError("no tokens to feed; pass at least one token id")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise UsageError(f"tokens must be a 1-D sequence of integer ids, got shape {arr.shape} of {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise UsageError(f"token id {bad} is out of range; ids must be in [0, {self.vocab_size})")
        return arr.astype(np.int64)

    def pkm_read(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """rows, weights (1, T, k) -> the weighted sum of the selected table rows (1, T, D)."""
        values = self._pkm_values[rows].astype(np.float32)  # (1, T, k, D)
        if self._pkm_scales is not None:
            values *= self._pkm_scales[rows][..., None]
        return np.einsum("btk,btkd->btd", weights, values)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Run 1..chunk tokens that do not cross a chunk boundary; return logits (T, V)."""
        t = len(tokens)
        offset = self.pos % self.chunk
        if t < 1 or offset + t > self.chunk:
            raise UsageError(f"a call takes 1 to {self.chunk - offset} tokens at chunk offset {offset}, got {t}")
        pos = np.array(self.pos, dtype=np.int64)

        feed = {"tokens": tokens.reshape(1, t), "pos": pos}
        feed.update({n: self.state[n] for n in self._head_states})
        hidden, rows, weights, *head_state = self._head.run(None, feed)

        feed = {"hidden": hidden + self.pkm_read(rows, weights), "pos": pos}
        feed.update({n: self.state[n] for n in self._tail_states})
        logits, *tail_state = self._tail.run(None, feed)

        self.state.update(zip(self._head_states, head_state))
        self.state.update(zip(self._tail_states, tail_state))
        self.pos += t
        return logits[0]

    def feed(self, tokens, *, all_logits: bool = False) -> np.ndarray:
        """Feed any number of tokens; return the last position's logits (V,), or all of them (N, V)."""
        arr = self._check_tokens(tokens)
        outputs = []
        start = 0
        while start < arr.size:
            n = min(self.chunk - self.pos % self.chunk, arr.size - start)
            logits = self.step(arr[start:start + n])
            # a copy, so that the call's full logits are freed now rather than when feed returns
            outputs.append(logits if all_logits else logits[-1:].copy())
            start += n
        return np.concatenate(outputs) if all_logits else outputs[-1][-1]

    # -- generation ---------------------------------------------------------

    def generate(
        self,
        prompt: list[int],
        *,
        max_new_tokens: int,
        sampling: SamplingOptions = SamplingOptions(),
        stop: tuple[int, ...] = (),
        vocab_limit: int | None = None,
    ) -> Iterator[int]:
        """Feed ``prompt`` and yield up to ``max_new_tokens`` new ids, ending after a stop id.

        Each yielded id is fed back, so afterwards the stream contains the prompt and every new id.
        ``vocab_limit`` excludes ids at or above it, for a tokenizer smaller than the model's vocabulary.
        """
        if max_new_tokens < 0:
            raise UsageError(f"max new tokens must be 0 or more, got {max_new_tokens}")
        logits = self.feed(prompt)
        rng = np.random.default_rng(sampling.seed)
        for _ in range(max_new_tokens):
            if vocab_limit is not None:
                logits = logits.copy()
                logits[vocab_limit:] = -np.inf
            token = sample_token(logits, sampling, rng)
            yield token
            if token in stop:
                return
            logits = self.feed([token])

    # -- saving and resuming ------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return bundle_fingerprint(self.manifest)

    def save_state(self, path: str | Path) -> None:
        """Write the position and state to ``path`` (atomically)."""
        save_state(Path(path), fingerprint=self.fingerprint, pos=self.pos, state=self.state)

    def load_state(self, path: str | Path) -> None:
        """Continue the stream saved in ``path``; raise StateError if it belongs to another bundle."""
        self.pos, self.state = load_state(Path(path), fingerprint=self.fingerprint, spec=self.state_spec)
