"""Prefill and decode speed and peak memory of hydra-29m bundles, int8 and float32, 1 and 2 threads.

Workloads (fixed, llama.cpp style): prefill of 8,192 tokens from a fresh
stream, then decode of 128 tokens one at a time. Each configuration runs in
its own process so that its peak RSS is its own; each is repeated and
reported as mean and spread. Usage:

    python benchmarks/runtime_speed.py [--repeats 3] [--prefill 8192] [--decode 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, random_bundle, write_results  # noqa: E402

PROBE = """
import json, sys, time
import numpy as np
from hydra_edge.runtime import HydraSession
bundle, threads, n_prefill, n_decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
session = HydraSession(bundle, threads=threads, check_hashes=False)
tokens = np.random.default_rng(0).integers(0, session.vocab_size, n_prefill)
session.feed(tokens[:256])  # warm-up: every call length the prefill uses
session.reset()
start = time.perf_counter()
logits = session.feed(tokens)
prefill = time.perf_counter() - start
token = int(logits.argmax())
start = time.perf_counter()
for _ in range(n_decode):
    token = int(session.feed([token]).argmax())
decode = time.perf_counter() - start
# VmHWM is this process's own peak; ru_maxrss can report the parent's peak from before exec
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"prefill_tps": n_prefill / prefill, "decode_tps": n_decode / decode,
                  "peak_rss_mib": peak_kib / 1024}))
"""


def measure(bundle: Path, threads: int, n_prefill: int, n_decode: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(bundle), str(threads), str(n_prefill), str(n_decode)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=8192)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--bundles", type=Path, default=Path(tempfile.gettempdir()) / "hydra-edge-bench")
    args = parser.parse_args()
    args.bundles.mkdir(parents=True, exist_ok=True)

    rows, results = [], []
    for quantize in ("int8", "none"):
        bundle = random_bundle("hydra-29m", quantize, args.bundles)
        size_mb = sum(p.stat().st_size for p in bundle.iterdir()) / 1e6
        for threads in (1, 2):
            runs = [measure(bundle, threads, args.prefill, args.decode) for _ in range(args.repeats)]
            entry = {"bundle": "hydra-29m " + ("int8" if quantize == "int8" else "float32"), "size_mb": size_mb,
                     "threads": threads, "runs": runs}
            for key in ("prefill_tps", "decode_tps", "peak_rss_mib"):
                values = [r[key] for r in runs]
                entry[key] = statistics.mean(values)
                entry[key + "_spread"] = (max(values) - min(values)) / 2
            results.append(entry)
            rows.append([entry["bundle"], f"{size_mb:.1f}", threads,
                         f"{entry['prefill_tps']:,.0f} ± {entry['prefill_tps_spread']:,.0f}",
                         f"{entry['decode_tps']:,.0f} ± {entry['decode_tps_spread']:,.0f}",
                         f"{entry['peak_rss_mib']:.0f}"])
            print(rows[-1], file=sys.stderr)

    table = markdown_table(
        ["bundle", "size MB", "threads", f"prefill {args.prefill} tok/s", f"decode {args.decode} tok/s", "peak RSS MiB"],
        rows)
    write_results("runtime_speed", {"machine": machine(), "workload": vars(args) | {"bundles": str(args.bundles)},
                                    "results": results}, table)


if __name__ == "__main__":
    main()
