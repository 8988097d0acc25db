"""Process-group setup from the launcher's environment (torchrun, deepspeed, or none)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env() -> DistEnv:
    """RANK / LOCAL_RANK / WORLD_SIZE as torchrun and the deepspeed launcher set them (absent: 1 process)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DistEnv(rank, local_rank, world_size, device)


def init_process_group(env: DistEnv, timeout_s: int) -> None:
    """nccl on GPU, gloo on CPU; needs MASTER_ADDR/MASTER_PORT from the launcher."""
    global _STARTED
    if torch_dist.is_initialized():
        _STARTED = True
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"{name} is not set: launch with torchrun or deepspeed for world size > 1")
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    # DeepSpeed makes its data-parallel group with new_group(ranks) and no timeout, and torch gives such
    # groups its module default (30 min gloo, 10 min nccl), not the world group's: a peer lost without a
    # TCP reset (link down, host frozen) would hang every rank that long. Make ours the default first.
    torch_dist.distributed_c10d.default_pg_timeout = timeout
    torch_dist.distributed_c10d.default_pg_nccl_timeout = timeout
    torch_dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    _STARTED = True


_STARTED = False  # whether this process joined a process group (the exit below needs to know afterwards)


def exit_process(code: int) -> None:
    """End ``python -m trainer``: after a multi-rank run without interpreter finalization.

    Process-group objects still referenced after ``destroy_process_group`` (device meshes, gloo async
    work holding tensors) can abort the process while Python tears down (pytorch/pytorch#179291): the
    launcher then reports a failed rank after a run that finished. Everything of ours is closed and
    written by then; streams and log handlers are flushed here.
    """
    if not _STARTED:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def destroy_process_group() -> None:
    """Tear down after a clean run so the launcher sees every rank exit."""
    if torch_dist.is_initialized():
        # Every rank must be done with collectives before any rank tears gloo down (rank 0 finishes last).
        torch_dist.barrier()
        torch_dist.destroy_process_group()
