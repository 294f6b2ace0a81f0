"""Options of a training run, importable without torch so that the CLI can show their defaults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UsageError

TASKS = ("logic", "text", "recall", "domains", "facts")

# Sizes past these bounds would make one CPU step take minutes and tens of GiB,
# so they are far more likely typing mistakes than intended runs.
MAX_SEQ_LEN = 16_384
MAX_TOKENS_PER_STEP = 1 << 16


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run. The defaults train hydra-tiny on the logic task."""

    # task
    task: Literal["logic", "text", "recall", "domains", "facts"] = "logic"  # the last three are ablation probes
    data: str | None = None  # text file, required by the text task only

    # batches
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128  # tokens per sequence (the logic task packs several problems into one)

    # optimiser: AdamW, linear warm-up to lr, then cosine decay to lr * min_lr_ratio
    lr: float = 6e-3  # tuned on hydra-tiny and the logic task only
    min_lr_ratio: float = 0.1
    warmup: int = 100  # steps, capped at the number of steps
    weight_decay: float = 0.1  # applied to matrices only, not to norms, biases or gate vectors
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # maximum global gradient norm
    aux_weight: float = 0.01  # weight of the MoE load-balancing loss

    # logic task
    max_hops: int = 8
    n_distractors: int = 4  # distractor premises per problem
    curriculum: bool = True  # start with 1-hop problems and add longer chains as accuracy rises
    curriculum_threshold: float = 0.5  # running training accuracy that unlocks the next hop count

    # evaluation, output and resources
    eval_batches: int = 16
    seed: int = 0
    threads: int | None = None  # torch threads per process (None: the cores divided by the local processes)
    out: str = "model.pt"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UsageError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        if self.task == "text" and self.data is None:
            raise UsageError("the text task needs a text file: pass --data PATH")
        if self.task != "text" and self.data is not None:
            raise UsageError(f"--data is only read by --task text; the {self.task} task generates its own data")
        # fields that are CLI options are named as options, the others as fields
        positive = {"--steps": self.steps, "--batch-size": self.batch_size, "--seq-len": self.seq_len,
                    "--eval-batches": self.eval_batches, "max_hops": self.max_hops}
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if self.seq_len > MAX_SEQ_LEN:
            raise UsageError(f"--seq-len {self.seq_len:,} is more than {MAX_SEQ_LEN:,}; train on shorter sequences "
                             "(the trained model still reads input of any length)")
        if self.batch_size * self.seq_len > MAX_TOKENS_PER_STEP:
            raise UsageError(f"--batch-size x --seq-len = {self.batch_size * self.seq_len:,} tokens per step is more "
                             f"than {MAX_TOKENS_PER_STEP:,}; lower one of them")
        if not 0 < self.lr < math.inf:
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be 0 or more steps, got {self.warmup}")
        if not 0 < self.curriculum_threshold <= 1:
            raise UsageError(f"curriculum_threshold must be in (0, 1], got {self.curriculum_threshold}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out
