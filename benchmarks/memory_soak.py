"""Stream 1,000,000 tokens through the hydra-29m int8 bundle and watch memory and numbers.

Records private memory (USS) and the largest absolute state value at
intervals, and fails on NaN or Inf in logits or state. Usage:

    python benchmarks/memory_soak.py [--tokens 1000000] [--every 50000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, random_bundle, write_results  # noqa: E402

WARM_UP = 5_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=50_000)
    parser.add_argument("--preset", default="hydra-29m")
    parser.add_argument("--bundles", type=Path, default=Path(tempfile.gettempdir()) / "hydra-edge-bench")
    args = parser.parse_args()
    args.bundles.mkdir(parents=True, exist_ok=True)

    from hydra_edge.runtime import HydraSession

    bundle = random_bundle(args.preset, "int8", args.bundles)
    session = HydraSession(bundle, threads=1, check_hashes=False)
    process = psutil.Process(os.getpid())
    rng = np.random.default_rng(0)
    chunk = session.chunk

    def stream(n: int) -> float:
        """Feed n random tokens in whole chunks; return the largest |logit| seen, raise on NaN/Inf."""
        worst = 0.0
        for start in range(0, n, chunk):
            logits = session.feed(rng.integers(0, session.vocab_size, min(chunk, n - start)))
            if not np.isfinite(logits).all():
                raise SystemExit(f"non-finite logits at position {session.pos}")
            worst = max(worst, float(np.abs(logits).max()))
        return worst

    stream(WARM_UP)
    base = process.memory_full_info().uss
    samples = []
    start = time.perf_counter()
    while session.pos < WARM_UP + args.tokens:
        max_logit = stream(min(args.every, WARM_UP + args.tokens - session.pos))
        state_max = max(float(np.abs(v).max()) for v in session.state.values())
        if not all(np.isfinite(v).all() for v in session.state.values()):
            raise SystemExit(f"non-finite state at position {session.pos}")
        uss = process.memory_full_info().uss
        samples.append({"tokens": session.pos - WARM_UP, "uss_mib": uss / 2**20, "uss_growth_mib": (uss - base) / 2**20,
                        "max_abs_state": state_max, "max_abs_logit": max_logit,
                        "seconds": time.perf_counter() - start})
        print(samples[-1], file=sys.stderr, flush=True)

    growth = max(s["uss_growth_mib"] for s in samples)
    summary = {"tokens": args.tokens, "non_finite": 0, "max_uss_growth_mib": growth,
               "tokens_per_s": args.tokens / samples[-1]["seconds"]}
    rows = [[f"{s['tokens']:,}", f"{s['uss_mib']:.1f}", f"{s['uss_growth_mib']:+.2f}", f"{s['max_abs_state']:.3g}",
             f"{s['max_abs_logit']:.3g}"] for s in samples]
    table = (f"{args.preset} int8, random weights, {args.tokens:,} tokens after a {WARM_UP:,}-token warm-up, 1 thread: "
             f"no NaN or Inf, largest USS growth {growth:+.2f} MiB, {summary['tokens_per_s']:,.0f} tokens/s\n\n")
    table += markdown_table(["tokens", "USS MiB", "growth MiB", "max abs state", "max abs logit"], rows)
    write_results("memory_soak", {"machine": machine(), "summary": summary, "samples": samples}, table)


if __name__ == "__main__":
    main()
