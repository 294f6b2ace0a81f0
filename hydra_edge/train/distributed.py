"""Process-group setup for training under ``torchrun`` (DistributedDataParallel over gloo).

Without torchrun's environment (WORLD_SIZE unset or 1) training runs in one
process and nothing here touches torch.distributed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch.distributed as dist

from ..errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Rank and world size of this process. Rank 0 shows progress, evaluates and saves."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer; run under torchrun or unset it") from None


def init_distributed() -> DistContext:
    """Join the gloo process group that torchrun describes in WORLD_SIZE, RANK and MASTER_ADDR/PORT."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistContext()
    rank = _env_int("RANK", 0)
    ctx = DistContext(rank=rank, world_size=world_size, local_world_size=_env_int("LOCAL_WORLD_SIZE", world_size))
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="gloo")
        except ValueError as exc:
            # raised for a missing MASTER_ADDR or MASTER_PORT
            raise UsageError(f"WORLD_SIZE={world_size} is set but the process group failed to start ({exc}); run under torchrun") from None
    log.info("joined the gloo process group as rank %d of %d", rank, world_size)
    return ctx


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def default_threads(ctx: DistContext) -> int:
    """Return torch threads per process: the usable CPU cores divided evenly between this machine's processes."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // ctx.local_world_size)
