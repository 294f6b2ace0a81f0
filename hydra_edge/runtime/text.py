"""Text in and out of a bundle: its tokenizer, and streaming a whole file for loss and perplexity."""

from __future__ import annotations

import codecs
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
from tokenizers import Tokenizer

from ..errors import BundleError, UsageError

READ_BLOCK_BYTES = 1 << 16
NUL = bytes(1)


def load_tokenizer(bundle: Path, manifest: dict) -> Tokenizer:
    path = Path(bundle) / manifest.get("tokenizer", {}).get("file", "tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a bad file
        raise BundleError(f"cannot read the tokenizer {path}: {exc}") from None


def iter_text_blocks(path: Path, block_bytes: int = READ_BLOCK_BYTES) -> Iterator[str]:
    """Yield the file's text in blocks that end at a line break, so that tokens never span two blocks.

    Raises UsageError for a missing, empty or binary file (a NUL byte or invalid UTF-8).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise UsageError(f"{path} is empty; give a text file with at least two tokens")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    carry = ""
    offset = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(block_bytes)
            if NUL in raw:
                where = offset + raw.index(NUL)
                raise UsageError(f"{path} is a binary file (NUL byte at byte {where}); give a UTF-8 text file")
            try:
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                raise UsageError(f"{path} is not UTF-8 text (invalid byte near byte {offset + exc.start}); give a UTF-8 text file") from None
            offset += len(raw)
            if not raw:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut == 0:
                carry = text
                continue
            yield text[:cut]
            carry = text[cut:]


@dataclass
class StreamReport:
    tokens: int
    loss: float  # mean negative log-likelihood, nats per token, over tokens 2..N
    seconds: float
    peak_rss_bytes: int
    uss_bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits (N, V), targets (N,) -> log p(target) for each row."""
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return logits[np.arange(len(targets)), targets] - lse


def stream_file(session, tokenizer: Tokenizer, path: Path, *, on_progress: Callable[[int, int], None] | None = None) -> StreamReport:
    """Feed a whole text file through ``session`` and measure loss, speed and memory.

    Memory stays flat: the file is read in blocks, and only the last position's
    logits are kept between blocks.
    """
    total_bytes = Path(path).stat().st_size
    process = psutil.Process(os.getpid())
    nll, scored, tokens = 0.0, 0, 0
    prev_logits = None
    start = time.perf_counter()
    done_bytes = 0
    for block in iter_text_blocks(path):
        ids = np.array(tokenizer.encode(block).ids, dtype=np.int64)
        done_bytes += len(block.encode("utf-8"))
        if ids.size == 0:
            continue
        logits = session.feed(ids, all_logits=True)
        if prev_logits is not None:
            nll -= float(log_softmax_at(prev_logits[None], ids[:1])[0])
            scored += 1
        if ids.size > 1:
            nll -= float(log_softmax_at(logits[:-1], ids[1:]).sum())
            scored += ids.size - 1
        prev_logits = logits[-1]
        tokens += ids.size
        if on_progress:
            on_progress(done_bytes, total_bytes)
    seconds = time.perf_counter() - start
    if scored == 0:
        raise UsageError(f"{path} has fewer than two tokens; nothing to score")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return StreamReport(tokens=tokens, loss=nll / scored, seconds=seconds,
                        peak_rss_bytes=peak, uss_bytes=process.memory_full_info().uss)
