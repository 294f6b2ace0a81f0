"""One profiling measurement, run in its own process: ``python -m hydra_edge.profile.probe REQUEST_JSON``.

The process opens a bundle, prefills ``length`` tokens from a fresh stream,
then decodes ``decode_tokens`` tokens one at a time. It reports each stage as
one JSON line appended to the file ``events``, so that the parent can still
read the progress of a process it had to stop. It imports numpy,
onnxruntime, psutil and the runtime only, never torch.

Prefill stops at ``time_limit_s``. Decode then still runs, from a context
filled to ``length``: a transformer's cache is extended by repeating the
entries it computed, and a Hydra state, whose size does not depend on the
context, only moves its position. A decode call costs the same for any
cache values, so this measures decode at ``length`` without the prefill.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from ..runtime.transformer_session import TransformerSession, open_session

# prefill writes a progress event about this often (in tokens); the time bound is checked after every call
PROGRESS_TOKENS = 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started its program.

    On Linux this is ``VmHWM`` from /proc/self/status, because ``ru_maxrss``
    carries over the parent's peak through fork and exec. Elsewhere it is
    ``ru_maxrss`` (bytes on macOS, KiB on other systems).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class EventLog:
    """Appends one JSON object per line to a file, flushed at once."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, **fields}) + "\n")
        self._file.flush()


def fill_context(session, length: int) -> None:
    """Bring ``session`` to position ``length`` without running the model (see the module docstring)."""
    if isinstance(session, TransformerSession):
        for name, cache in session.state.items():
            repeats = -(-length // cache.shape[2])  # ceiling division
            session.state[name] = np.ascontiguousarray(np.tile(cache, (1, 1, repeats, 1))[:, :, :length])
    session.pos = length


def prefill(session, tokens: np.ndarray, deadline: float, events: EventLog) -> tuple[int, float, np.ndarray | None]:
    """Feed ``tokens`` until done or past ``deadline``; return (tokens fed, seconds, last logits).

    Each ``feed`` call gets at most ``session.chunk`` tokens, the longest call
    either runtime makes, so that no call keeps the logits of earlier ones.
    """
    logits = None
    done, reported = 0, 0
    start = time.perf_counter()
    while done < tokens.size:
        logits = session.feed(tokens[done:done + session.chunk])
        done = min(done + session.chunk, tokens.size)
        if done - reported >= PROGRESS_TOKENS or done == tokens.size:
            events.write("prefill_progress", tokens=done, seconds=time.perf_counter() - start,
                         rss_bytes=psutil.Process().memory_info().rss)
            reported = done
        if time.perf_counter() > deadline and done < tokens.size:
            events.write("prefill_progress", tokens=done, seconds=time.perf_counter() - start,
                         rss_bytes=psutil.Process().memory_info().rss)
            break
    return done, time.perf_counter() - start, logits


def decode(session, logits: np.ndarray, n_tokens: int, deadline: float) -> tuple[int, float]:
    """Greedy decode of up to ``n_tokens`` tokens, at least one even past ``deadline``; return (tokens, seconds)."""
    token = int(np.argmax(logits))
    done = 0
    start = time.perf_counter()
    while done < n_tokens:
        token = int(np.argmax(session.feed([token])))
        done += 1
        if time.perf_counter() > deadline:
            break
    return done, time.perf_counter() - start


def run(request: dict[str, Any]) -> None:
    """Measure one length as ``request`` describes; every result goes to the event file."""
    events = EventLog(Path(request["events"]))
    length = int(request["length"])
    time_limit = float(request["time_limit_s"])
    process = psutil.Process(os.getpid())

    # 1. open the bundle and warm up with one prefill call and one decode call
    session = open_session(request["bundle"], threads=int(request["threads"]), check_hashes=False)
    if request.get("tokens_file"):
        tokens = np.load(request["tokens_file"], allow_pickle=False)[:length].astype(np.int64)
    else:
        tokens = np.random.default_rng(int(request.get("seed", 0))).integers(0, session.vocab_size, length)
    session.feed(tokens[: min(length, 2 * session.chunk)])
    session.feed(tokens[:1])
    session.reset()
    events.write("loaded", uss_bytes=process.memory_full_info().uss, rss_bytes=process.memory_info().rss)

    # 2. prefill from a fresh stream, bounded by the time limit
    done, seconds, logits = prefill(session, tokens, time.perf_counter() + time_limit, events)
    events.write("prefill", tokens=done, length=length, seconds=seconds, complete=done == length)

    # 3. decode at context ``length``, from a filled context if prefill stopped early
    if done < length:
        fill_context(session, length)
    n_decoded, decode_seconds = decode(session, logits, int(request["decode_tokens"]), time.perf_counter() + time_limit)
    events.write("decode", tokens=n_decoded, seconds=decode_seconds, context=length,
                 state="prefilled" if done == length else "filled")

    # 4. memory: the peak over the whole run, and the private memory now, with the context at its longest
    events.write("done", peak_rss_bytes=peak_rss_bytes(), uss_bytes=process.memory_full_info().uss,
                 rss_bytes=process.memory_info().rss)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m hydra_edge.profile.probe REQUEST_JSON")
    run(json.loads(argv[0]))


if __name__ == "__main__":
    main()
