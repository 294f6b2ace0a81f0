"""The training loop: AdamW with linear warm-up and cosine decay, a held-out evaluation, a checkpoint.

Under ``torchrun`` the same call trains with DistributedDataParallel over
gloo: each rank draws different data from seed + rank, and only rank 0 shows
progress, evaluates and writes the checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import HydraEdgeError
from ..model import build_model, count_parameters
from .checkpoint import check_output_path, save_checkpoint
from .distributed import DistContext, default_threads, init_distributed, shutdown_distributed
from .logic import IGNORE_INDEX, LogicTask
from .options import TrainConfig
from .probes import PROBE_TASKS, ProbeTask
from .text import TextTask

log = logging.getLogger(__name__)

Task = LogicTask | TextTask | ProbeTask

# window of the recall probe for a model without one (the transformer attends to its whole context)
DEFAULT_PROBE_WINDOW = 32


@dataclass
class TrainResult:
    """Outcome of a training run. On ranks other than 0, ``eval`` is empty and ``checkpoint`` is None."""

    steps: int
    losses: list[float]  # training loss (cross-entropy only) of every step on this rank
    final_loss: float  # mean of the last 10% of ``losses``
    seconds: float  # training time without evaluation and saving
    tokens_per_second: float  # over all ranks
    model: nn.Module  # the trained model (this rank's copy), in eval mode
    eval: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    world_size: int = 1


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then cosine decay to lr * min_lr_ratio."""
    warmup = min(cfg.warmup, cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(cfg.steps - warmup, 1)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_task(model_cfg: ModelConfig, cfg: TrainConfig, ctx: DistContext) -> Task:
    """Build the task of ``cfg``. Its data comes from seed + rank, so every rank draws different batches."""
    data_seed = cfg.seed + ctx.rank
    if cfg.task == "logic":
        return LogicTask(
            model_cfg.vocab_size, cfg.seq_len, max_hops=cfg.max_hops, n_distractors=cfg.n_distractors,
            seed=data_seed, curriculum=cfg.curriculum, curriculum_threshold=cfg.curriculum_threshold,
        )
    if cfg.task in PROBE_TASKS:
        window = getattr(model_cfg, "window", DEFAULT_PROBE_WINDOW)
        return ProbeTask(cfg.task, model_cfg.vocab_size, cfg.seq_len, seed=data_seed, window=window)
    if not ctx.enabled:
        return TextTask(cfg.data, model_cfg.vocab_size, cfg.seq_len, seed=data_seed)

    # rank 0 trains the tokenizer and sends it to the others, so that all ranks encode the text alike
    task = TextTask(cfg.data, model_cfg.vocab_size, cfg.seq_len, seed=data_seed) if ctx.is_main else None
    payload = [task.tokenizer.to_str() if task is not None else None]
    dist.broadcast_object_list(payload, src=0)
    if task is None:
        tokenizer = Tokenizer.from_str(payload[0])
        task = TextTask(cfg.data, model_cfg.vocab_size, cfg.seq_len, seed=data_seed, tokenizer=tokenizer)
    return task


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _run_steps(
    model: nn.Module, task: Task, cfg: TrainConfig, ctx: DistContext
) -> tuple[list[float], float]:
    """Run the optimisation steps and return the loss of every step and the elapsed seconds."""
    optimizer = make_optimizer(model, cfg)
    losses: list[float] = []
    tokens_per_step = cfg.batch_size * cfg.seq_len * ctx.world_size
    bar = tqdm(range(cfg.steps), desc="train", unit="step", file=sys.stderr,
               disable=not (cfg.progress and ctx.is_main), dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        inputs, labels = task.sample_batch(cfg.batch_size)

        logits, aux = model(inputs)  # (B, T, V), scalar
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        loss = ce + cfg.aux_weight * aux

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        losses.append(ce.item())
        if not math.isfinite(losses[-1]):
            raise HydraEdgeError(f"training loss became {losses[-1]} at step {step}; lower --lr and retry")
        task_fields = task.record_step(logits, labels)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_step * (step + 1) / elapsed:,.0f}",
                        **task_fields)
    bar.close()
    return losses, time.perf_counter() - start


def train(model_cfg: ModelConfig, cfg: TrainConfig) -> TrainResult:
    """Train a fresh model of ``model_cfg``, evaluate it on held-out data and save a checkpoint to ``cfg.out``."""
    ctx = init_distributed()
    try:
        return _train(model_cfg, cfg, ctx)
    finally:
        shutdown_distributed(ctx)


def _train(model_cfg: ModelConfig, cfg: TrainConfig, ctx: DistContext) -> TrainResult:
    # 1. checks and set-up that can fail on user input, before any long work
    check_output_path(cfg.out)
    threads = cfg.threads or default_threads(ctx)
    cores = os.cpu_count() or 1
    if threads > cores:
        # 100,000 threads crashed torch's thread pool with a segfault, and more threads than cores do not help
        log.warning("--threads %d is more than the %d CPU cores; using %d", threads, cores, cores)
        threads = cores
    torch.set_num_threads(threads)
    started = time.perf_counter()
    task = build_task(model_cfg, cfg, ctx)
    log.info("prepared the %s task in %.1f s", cfg.task, time.perf_counter() - started)

    # 2. the model: the same initial weights on every rank (DDP also broadcasts rank 0's)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    model.train()
    log.info("built %s with %s parameters, %d torch threads", model_cfg.name,
             f"{count_parameters(model):,}", torch.get_num_threads())
    # experts that no chunk routes to get no gradient, hence find_unused_parameters
    trained = DistributedDataParallel(model, find_unused_parameters=True) if ctx.enabled else model

    # 3. optimisation
    losses, seconds = _run_steps(trained, task, cfg, ctx)
    tail = losses[-max(1, len(losses) // 10):]
    result = TrainResult(
        steps=cfg.steps, losses=losses, final_loss=sum(tail) / len(tail), seconds=seconds,
        tokens_per_second=cfg.steps * cfg.batch_size * cfg.seq_len * ctx.world_size / seconds,
        model=model, world_size=ctx.world_size,
    )
    log.info("trained %d steps in %.1f s, final loss %.4f", cfg.steps, seconds, result.final_loss)

    # 4. rank 0 evaluates and saves while the other ranks wait
    if ctx.is_main:
        started = time.perf_counter()
        result.eval = task.evaluate(model, batches=cfg.eval_batches, batch_size=cfg.batch_size)
        log.info("evaluated on held-out data in %.1f s", time.perf_counter() - started)
        record = {
            "steps": result.steps, "final_loss": result.final_loss, "seconds": result.seconds,
            "tokens_per_second": result.tokens_per_second, "world_size": ctx.world_size,
            "eval": result.eval, "config": cfg.to_dict(),
        }
        save_checkpoint(cfg.out, model, model_cfg, task.tokenizer, task=cfg.task, train=record)
        result.checkpoint = Path(cfg.out)
    if ctx.enabled:
        dist.barrier()
    model.eval()
    return result
