"""Process-group setup from the launcher's environment (torchrun, deepspeed, or none)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType, TracebackType

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


HOST_MMAP_THRESHOLD_BYTES = 1 << 20
"""CPU ranks: tensors of at least this size get their own mapping (``host_allocator_for_cpu_ranks``)."""
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def host_allocator_for_cpu_ranks(env: DistEnv) -> bool:
    """On a CPU rank, serve tensors of 1 MiB and more from mmap instead of the heap (glibc ``mallopt``).

    glibc raises its mmap threshold to the largest block it has freed (up to 32 MiB), so after the first
    checkpoint read every gathered block, gradient shard and optimizer temporary comes from the heap,
    where the small activations a step keeps land in the holes of the freed blocks and the next block's
    buffer goes to the top: a ViT-B-32 FSDP2 rank held 0.4-0.5 GiB of free heap pages beside 0.52-0.62
    GiB in use (peak RssAnon 1.36-1.50 GiB, planned 0.93), a ViT-g rank 1.5-2 GiB. A fixed threshold
    hands every freed large tensor back at once: 1.00 GiB, at the price of page faults (measured on
    ViT-B-32 at batch 2: +1 s of system time per step over 2 ranks; docs/results.md). A GPU rank's
    tensors are not on this heap: unchanged. Returns whether the setting was applied.
    """
    if env.device.type != "cpu":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc
        return False


def init_process_group(env: DistEnv, timeout_s: int) -> None:
    """nccl on GPU, gloo on CPU; needs MASTER_ADDR/MASTER_PORT from the launcher."""
    global _STARTED
    host_allocator_for_cpu_ranks(env)
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

    Process groups stay referenced after ``destroy_process_group`` (DeepSpeed's globals, ZeRO-3 parameters),
    so their gloo worker threads live on; one that drops a finished work's tensors while Python tears down
    takes the GIL and aborts the process (pytorch/pytorch#190489; a core dump of our test workers showed
    ``runLoop -> ~Work -> decref_pyobject -> take_gil -> terminate``). The launcher then reports a failed rank
    after a run that finished. Everything of ours is closed and written by then; streams and log handlers are
    flushed here.
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


# Graceful stop and wall-time checkpoints: when a run ends early, it ends at a step boundary, saved.
#
# SIGINT (Ctrl-C) and SIGTERM (what launchers and schedulers send first) only set a flag here; the
# training loop reads it after each optimizer step, finishes that step, saves a complete checkpoint
# and exits with ``STOP_EXIT_CODE``. A signal may reach some ranks and not others (a ``kill`` of one
# process, a scheduler signalling one node), so the loop never acts on its own flag: ``StepFlags``
# reduces every rank's flag (and rank 0's wall-time verdict) once per step, and every rank acts on the
# same result. Repeated signals are not escalated: a Ctrl-C in a terminal reaches the launcher and the
# ranks together, and the launcher forwards it again. The hard stop is SIGKILL (launchers send it
# after their grace period: torchrun ``--shutdown-timeout``, DeepSpeed's 30 s).

STOP_EXIT_CODE = 130
"""Exit status of a run stopped by a signal (the shell's 128 + SIGINT)."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered (main thread only): SIGINT / SIGTERM set ``received`` instead of ending the process."""

    def __init__(self) -> None:
        self.received: int | None = None
        """The last stop signal received, or None."""
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
            # Restart interrupted system calls: C++ collectives (gloo, TCPStore) below us need not see EINTR.
            signal.siginterrupt(sig, False)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None


class StepFlags:
    """Once per step, on every rank: (stop, checkpoint now) agreed by all ranks in one small all-reduce.

    ``stop``: some rank received a stop signal. ``checkpoint now``: rank 0's clock says
    ``every_minutes`` have passed since the last checkpoint (only rank 0 decides, so that ranks whose
    clocks or step times differ cannot disagree). ``reduce`` is the engine's mean over ranks: a flag
    is set on some rank exactly when its mean is above zero.
    """

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor], *, is_main: bool,
                 stop: StopSignals | None, every_minutes: float) -> None:
        self.reduce, self.is_main, self.stop = reduce, is_main, stop
        self.every_s = every_minutes * 60.0
        self.last_save = time.monotonic()

    def saved(self) -> None:
        """A checkpoint was just written: the wall-time interval starts again."""
        self.last_save = time.monotonic()

    def agree(self) -> tuple[bool, bool]:
        """(stop, checkpoint now), the same on every rank (a collective: every rank calls it every step)."""
        stop = self.stop is not None and self.stop.requested
        timed = self.is_main and self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s
        flags = self.reduce(torch.tensor([float(stop), float(timed)]))
        return bool(flags[0] > 0), bool(flags[1] > 0)


def stopped_message(step: int, checkpoint: str, resume: str) -> str:
    """The one line rank 0 prints after a stop: where the run stopped and how to go on."""
    if resume == "auto":
        return f"stopped at step {step}; resume with the same command (checkpoint {checkpoint})"
    return (f"stopped at step {step}; checkpoint {checkpoint}; resume with the same command and "
            f"checkpoint.resume=auto (or checkpoint.resume={checkpoint})")
