"""Training under torch.distributed.run: two gloo processes on this machine."""

import os
import socket
import subprocess
import sys

import torch

from hydra_edge.config import get_preset
from hydra_edge.train.checkpoint import load_checkpoint
from hydra_edge.train.distributed import DistContext, default_threads
from hydra_edge.train.loop import build_task
from hydra_edge.train.options import TrainConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_write_one_checkpoint(tmp_path):
    out = tmp_path / "ddp.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "hydra_edge.cli", "train", "--preset", "hydra-tiny", "--task", "logic", "--steps", "4",
        "--batch-size", "4", "--seq-len", "64", "--eval-batches", "1", "--threads", "1", "--no-progress",
        "--out", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr[-3000:]
    # only rank 0 evaluates and prints
    assert proc.stdout.count("held-out accuracy by hop count") == 1
    assert f"saved {out}: 4 steps" in proc.stdout
    assert "on 2 process(es)" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["ddp.pt"]

    _, cfg, _, meta = load_checkpoint(out)
    assert cfg.name == "hydra-tiny"
    assert meta["train"]["world_size"] == 2
    assert meta["train"]["steps"] == 4


def test_ranks_draw_different_batches():
    cfg = TrainConfig(seq_len=64)
    model_cfg = get_preset("hydra-tiny")
    rank0 = build_task(model_cfg, cfg, DistContext(rank=0, world_size=1))
    rank1 = build_task(model_cfg, cfg, DistContext(rank=1, world_size=1))
    inputs0, _ = rank0.sample_batch(4)
    inputs1, _ = rank1.sample_batch(4)
    assert not torch.equal(inputs0, inputs1)


def test_threads_split_between_local_processes():
    alone = default_threads(DistContext())
    shared = default_threads(DistContext(rank=0, world_size=2, local_world_size=2))
    assert alone >= 1
    assert shared == max(1, alone // 2)
