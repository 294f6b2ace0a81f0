"""Check that bundles exported on x86-64 give the same results on another machine, such as aarch64.

The check has two steps, normally on two machines:

    python scripts/arm64_check.py reference DIR   # x86-64, with torch
    python scripts/arm64_check.py check DIR       # the target machine, runtime packages only

``reference`` exports a seeded random hydra-tiny as a float32 and an int8
bundle into DIR, runs the same token stream and generations through both with
the onnxruntime runtime, and saves the logits and token ids. ``check`` imports
only ``hydra_edge.runtime`` (numpy, onnxruntime, tokenizers and psutil, never
torch), repeats the same work and compares:

- float32 logits within FLOAT32_MAX_ABS_DIFF of the reference at every position;
- int8 top-1 next-token agreement with the reference of at least INT8_MIN_TOP1;
- a state saved mid-chunk and loaded into a new session gives exactly the
  logits of the stream that went on without the save;
- generation yields the requested number of ids, each in the vocabulary.

It exits with 0 when every check passes and 1 otherwise.
``scripts/check-arm64.sh`` runs both steps, ``check`` under an emulated aarch64
Python. Only the standard library and the runtime's packages are used, so
``check`` runs on a board where hydra-edge is installed without its extras.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

# The runtime is imported inside the functions that need it, so that a
# missing package on the target machine fails with a clear message.

PRESET = "hydra-tiny"
MODEL_SEED = 0
TOKEN_SEED = 1
STREAM_TOKENS = 512
# A position that is not a multiple of hydra-tiny's chunk (16), so the resumed
# stream starts in the middle of a chunk.
RESUME_AT = 203
GENERATE_TOKENS = 24
PROMPT = "the cat sat on the mat and the dog sat on the cat"
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 0}

FLOAT32_MAX_ABS_DIFF = 1e-4
INT8_MIN_TOP1 = 0.99

BUNDLES = ("float32", "int8")
REFERENCE_FILE = "reference.json"

# A small word-level tokenizer. The check only needs the tokenizers package to
# load the bundle's tokenizer.json and encode a prompt.
WORDS = ["<unk>", "the", "cat", "dog", "sat", "on", "mat", "and", "a", "ran"]
TOKENIZER = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
    "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
    "model": {"type": "WordLevel", "vocab": {word: i for i, word in enumerate(WORDS)}, "unk_token": "<unk>"},
}


def package_versions() -> dict[str, str]:
    names = ("numpy", "onnxruntime", "tokenizers", "psutil")
    return {name: metadata.version(name) for name in names}


def machine_summary() -> dict[str, str]:
    return {"machine": platform.machine(), "python": platform.python_version(), **package_versions()}


def stream_tokens(vocab_size: int) -> np.ndarray:
    return np.random.default_rng(TOKEN_SEED).integers(0, vocab_size, size=STREAM_TOKENS, dtype=np.int64)


def run_bundle(bundle: Path, tokens: np.ndarray, state_file: Path) -> dict:
    """Stream ``tokens`` through ``bundle`` with a save at RESUME_AT, resume the save, and generate.

    Both machines run this same function, so the two sides make the same
    calls with the same lengths.
    """
    from hydra_edge.runtime import HydraSession
    from hydra_edge.runtime.sampling import SamplingOptions
    from hydra_edge.runtime.text import load_tokenizer

    session = HydraSession(bundle, threads=1, check_hashes=True)
    head = session.feed(tokens[:RESUME_AT], all_logits=True)
    session.save_state(state_file)
    tail = session.feed(tokens[RESUME_AT:], all_logits=True)

    resumed = HydraSession(bundle, threads=1, check_hashes=True)
    resumed.load_state(state_file)
    resumed_pos = resumed.pos
    resumed_tail = resumed.feed(tokens[RESUME_AT:], all_logits=True)

    tokenizer = load_tokenizer(bundle, session.manifest)
    prompt = tokenizer.encode(PROMPT).ids
    session.reset()
    greedy = list(session.generate(prompt, max_new_tokens=GENERATE_TOKENS))
    session.reset()
    sampled = list(session.generate(prompt, max_new_tokens=GENERATE_TOKENS, sampling=SamplingOptions(**SAMPLING)))

    return {
        "logits": np.concatenate([head, tail]),
        "resumed_pos": resumed_pos,
        "uninterrupted_tail": tail,
        "resumed_tail": resumed_tail,
        "prompt": prompt,
        "greedy": greedy,
        "sampled": sampled,
        "vocab_size": session.vocab_size,
    }


def make_reference(workdir: Path) -> int:
    """Export the bundles into ``workdir`` and record this machine's logits and generations."""
    import torch

    from hydra_edge.config import get_preset
    from hydra_edge.export.bundle import ExportOptions, export_model
    from hydra_edge.model import build_model

    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(MODEL_SEED)
    model = build_model(get_preset(PRESET)).eval()
    # A freshly built model keeps the SGA and MoE gates nearly shut. Half-open
    # gates make every path show in the logits that the check compares.
    for block in model.blocks:
        torch.nn.init.zeros_(block.controller.bias)

    tokenizer_json = json.dumps(TOKENIZER)
    tokens = stream_tokens(model.cfg.vocab_size)
    np.save(workdir / "tokens.npy", tokens)
    record = {"preset": PRESET, "host": machine_summary(), "bundles": {}}
    for name in BUNDLES:
        start = time.perf_counter()
        export_model(model, tokenizer_json, workdir / name, ExportOptions(quantize="none" if name == "float32" else name))
        result = run_bundle(workdir / name, tokens, workdir / f"reference-{name}.state.npz")
        np.save(workdir / f"reference-{name}.npy", result["logits"])
        record["bundles"][name] = {"greedy": result["greedy"], "sampled": result["sampled"]}
        print(f"reference: exported and ran the {name} bundle in {time.perf_counter() - start:.1f} s", flush=True)
    (workdir / REFERENCE_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return 0


class Report:
    """Named pass/fail results, printed as they come."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool]] = []

    def add(self, name: str, passed: bool, detail: str) -> None:
        self.results.append((name, passed))
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [name for name, passed in self.results if not passed]


def check_generation(report: Report, name: str, kind: str, ids: list, reference_ids: list, vocab_size: int) -> None:
    valid = len(ids) == GENERATE_TOKENS and all(isinstance(i, int) and 0 <= i < vocab_size for i in ids)
    # Matching the reference ids is reported but not required, because a near
    # tie in the logits may pick another token.
    same = "same as" if ids == reference_ids else "differs from"
    report.add(f"{name} {kind} generation", valid,
               f"{len(ids)} of {GENERATE_TOKENS} ids, all in [0, {vocab_size}): {'yes' if valid else 'no'}; "
               f"{same} the reference ids")


def run_check(workdir: Path) -> int:
    """Repeat the reference's work on this machine, compare, and return the exit code."""
    try:
        import hydra_edge.runtime  # noqa: F401  (fails here, not mid-check, when a package is missing)
    except ImportError as exc:
        print(f"error: cannot import the hydra-edge runtime: {exc}; install numpy, onnxruntime, tokenizers and psutil",
              file=sys.stderr)
        return 1
    reference_path = workdir / REFERENCE_FILE
    if not reference_path.is_file():
        print(f"error: {reference_path} not found; run 'arm64_check.py reference {workdir}' on an x86-64 machine "
              "and copy the folder here", file=sys.stderr)
        return 1
    record = json.loads(reference_path.read_text(encoding="utf-8"))
    tokens = np.load(workdir / "tokens.npy")

    this_machine = machine_summary()
    print(f"machine: {this_machine['machine']} (reference: {record['host']['machine']})")
    for key in ("python", "numpy", "onnxruntime", "tokenizers", "psutil"):
        print(f"{key}: {this_machine[key]} (reference: {record['host'][key]})")
    print(f"stream: {tokens.size} tokens through {record['preset']}, state saved at token {RESUME_AT}, "
          f"{GENERATE_TOKENS} generated tokens, 1 thread", flush=True)

    report = Report()
    for name in BUNDLES:
        start = time.perf_counter()
        result = run_bundle(workdir / name, tokens, workdir / f"check-{name}.state.npz")
        seconds = time.perf_counter() - start
        reference = np.load(workdir / f"reference-{name}.npy")
        logits = result["logits"]
        max_diff = float(np.abs(logits - reference).max())
        top1 = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
        figures = f"max abs diff {max_diff:.2e}, top-1 agreement {top1:.2%} over {len(logits)} positions ({seconds:.1f} s)"
        if name == "float32":
            report.add("float32 logits", max_diff <= FLOAT32_MAX_ABS_DIFF,
                       f"{figures}; limit: max abs diff {FLOAT32_MAX_ABS_DIFF:g}")
        else:
            report.add("int8 next token", top1 >= INT8_MIN_TOP1, f"{figures}; limit: top-1 agreement {INT8_MIN_TOP1:.0%}")

        resume_diff = float(np.abs(result["resumed_tail"] - result["uninterrupted_tail"]).max())
        resumed_ok = result["resumed_pos"] == RESUME_AT and resume_diff == 0.0
        report.add(f"{name} resumed state", resumed_ok,
                   f"position {result['resumed_pos']} (expected {RESUME_AT}), max abs diff {resume_diff:.2e} over the "
                   f"next {len(result['resumed_tail'])} positions against the uninterrupted stream; limit: 0")

        reference_ids = record["bundles"][name]
        check_generation(report, name, "greedy", result["greedy"], reference_ids["greedy"], result["vocab_size"])
        check_generation(report, name, "sampled", result["sampled"], reference_ids["sampled"], result["vocab_size"])

    report.add("torch not imported", "torch" not in sys.modules, "the runtime ran without torch")
    if report.failed:
        print(f"arm64 check FAILED on {this_machine['machine']}: {', '.join(report.failed)}")
        return 1
    print(f"arm64 check OK on {this_machine['machine']}: all {len(report.results)} checks met their limits")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("reference", "check"),
                        help="reference: export and record on x86-64 (needs torch); check: compare on the target machine")
    parser.add_argument("workdir", type=Path, help="folder for the bundles and reference results")
    args = parser.parse_args(argv)
    if args.step == "reference":
        return make_reference(args.workdir)
    return run_check(args.workdir)


if __name__ == "__main__":
    sys.exit(main())
