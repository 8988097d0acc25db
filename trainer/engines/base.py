"""The engine protocol: everything that differs between single-process, FSDP2 and DeepSpeed.

The loop calls, per optimizer step: ``set_hparams`` once, then for each micro-batch the task
(through ``student``/``teacher``) and ``backward``, then ``step``. ``save``/``load`` write and
read the student and its optimizer state in the engine's own sharded format; everything else in
a checkpoint (step, data, RNG, layout, atomic commit) is trainer/checkpoint.py's.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from trainer.config import EngineConfig, OptimConfig
from trainer.dist import DistEnv


@dataclass
class Models:
    """What the engine gets: raw fp32 CPU models and the per-family block list function."""

    student: nn.Module
    teacher: nn.Module
    blocks: Callable[[nn.Module], list[nn.Module]]
    """Transformer blocks of a model: the sharding / checkpointing units."""
    enable_activation_checkpointing: Callable[[nn.Module], None]


@dataclass
class SkeletonModels:
    """Models built with parameters on meta and real buffers, for an engine to shard first and fill after
    (``setup_sharded``): no rank ever holds either model whole."""

    teacher: nn.Module
    student: nn.Module
    blocks: Callable[[nn.Module], list[nn.Module]]
    enable_activation_checkpointing: Callable[[nn.Module], None]
    teacher_rows: Callable[[str, int, int], torch.Tensor]
    """Rows ``[start, stop)`` (dim 0) of a teacher parameter by name: each rank reads only its own."""
    shared: set[str]
    """Student parameter names that start equal to the teacher's: copied shard to shard. The others are
    written later through ``write_student_tensors``, before ``build_optimizer``."""


class Engine(Protocol):
    """Wraps student (trainable, with optimizer) and teacher (frozen, no optimizer), runs the step."""

    env: DistEnv
    checkpoint_format: str
    """What ``save`` writes: 'dcp' (torch.distributed.checkpoint, any world size) or 'deepspeed'."""

    def setup(self, models: Models) -> None:
        """Shard / place both models and build the optimizer; call once, before the first step.

        fsdp and deepspeed also build sharded from skeletons instead (prune.in_engine): ``setup_sharded``,
        then the student is written through ``write_student_tensors``, then ``build_optimizer``
        (``ShardedEngine``).
        """
        ...

    def student(self, images: torch.Tensor) -> object:
        """Student forward on this rank's images (its graph is kept)."""
        ...

    def teacher(self, images: torch.Tensor) -> object:
        """Teacher forward; the caller holds torch.no_grad."""
        ...

    def autocast(self) -> AbstractContextManager:
        """Context for the forward passes (bf16 autocast where the engine does no casting itself)."""
        ...

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        """Accumulate gradients of one micro-batch's loss (scaled for accumulation here)."""
        ...

    def step(self) -> torch.Tensor | float:
        """Clip, optimizer step, zero grads; returns the global grad norm before clipping (not synced)."""
        ...

    def set_hparams(self, *, lr: float, weight_decay: float) -> None:
        """lr for every group, weight_decay for the groups that decay (ndim >= 2)."""
        ...

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Average a small float tensor over ranks (logging only)."""
        ...

    def teacher_local_numel(self) -> int:
        """Teacher parameter elements held by this rank (about total / world size when sharded)."""
        ...

    def gather_teacher_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) teacher parameters on every rank; a collective."""
        ...

    def gather_student_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) student parameters and buffers on every rank, on CPU; a collective."""
        ...

    def save(self, path: Path) -> None:
        """Write student weights and optimizer state under ``path`` (a collective; each rank its shards)."""
        ...

    def load(self, path: Path, *, saved_world_size: int) -> None:
        """Read what ``save`` wrote, possibly at another world size (a collective), after ``setup``."""
        ...

    def close(self) -> None:
        """Release engine resources before the process group goes."""
        ...


class ShardedEngine(Engine, Protocol):
    """What fsdp and deepspeed add for models that are sharded before they hold any value."""

    def setup_sharded(self, models: SkeletonModels) -> None:
        """Shard both skeletons, fill the teacher's shards and the student's ``shared`` tensors."""
        ...

    def gather_teacher_module(self, path: str) -> AbstractContextManager[dict[str, torch.Tensor]]:
        """Full tensors (parameters and buffers, names relative to ``path``) of teacher submodule ``path`` on
        every rank inside the context (a collective)."""
        ...

    def write_student_tensors(self, path: str, tensors: dict[str, torch.Tensor]) -> None:
        """Fill this rank's shards of the student submodule ``path``'s parameters from full tensors (names
        relative to ``path``, identical on every rank), cast to the student's dtype."""
        ...

    def teacher_module(self) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        """(the sharded teacher module, its forward on this rank's images); gradients may flow to the images."""
        ...

    def shard_numel(self) -> tuple[int, int]:
        """(teacher, student) parameter elements stored on this rank."""
        ...

    def build_optimizer(self) -> None:
        """The optimizer on the student, once every tensor of it is written."""
        ...


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, biases / norm / 1-d params (ndim <= 1) do not; frozen excluded."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # A ZeRO-3 partitioned parameter (built under zero.Init) is flat here; ds_shape is its real shape.
            ndim = len(getattr(param, "ds_shape", param.shape))
            (decay if ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "decays": True},
            {"params": no_decay, "weight_decay": 0.0, "decays": False}]


def make_adamw(groups: list[dict], optim: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW; lr and weight decay are set every step by the schedule."""
    return torch.optim.AdamW(groups, lr=0.0, betas=optim.betas, eps=optim.eps)


def apply_hparams(optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float) -> None:
    """Write the scheduled lr / wd into the optimizer's groups."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group.get("decays", True) else 0.0


def local_numel(module: nn.Module) -> int:
    """Elements of the parameters as stored on this rank (DTensor shards counted locally)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel()
    return total


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    # DCP warns on every call without a process group; the single engine has none on purpose.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def dcp_save(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Student and optimizer through torch.distributed.checkpoint: FQN-keyed, reshardable on load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not optimizer.state:
        # An optimizer that never stepped (run.steps=0) holds nothing: get_state_dict would first allocate
        # both AdamW moments by a zero step (8 bytes per parameter: 4.6 GiB per rank for an EVA-CLIP-E r=1
        # student on 2 ranks) only to write zeros. The checkpoint then holds the model alone; a resume
        # starts a fresh AdamW, as the run would have.
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=path, no_dist=not _distributed())


def dcp_load(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load ``dcp_save`` output into the (sharded or plain) model and optimizer; DCP reshards as needed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as err:
        raise ValueError(f"{path}: cannot read the DCP checkpoint: {err}") from err
    with_optimizer = any(key.startswith("optim.") for key in saved)
    if with_optimizer:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
    else:  # saved before any step (dcp_save): the optimizer stays as built
        state = {"model": get_model_state_dict(model)}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    except Exception as err:  # DCP raises CheckpointException & co.; users need the path
        raise ValueError(f"{path}: cannot load the DCP checkpoint: {err}") from err
    if with_optimizer:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])


FROZEN_STUDENT_FILE = "student-{:05d}.safetensors"
"""Where an engine that builds no optimizer (run.steps=0) writes the student: fp32, whole, in chunks."""


def frozen_student_files(path: Path) -> list[Path]:
    """The chunk files of a ``FROZEN_STUDENT_FILE`` checkpoint, in order."""
    files = sorted(path.glob(FROZEN_STUDENT_FILE.replace("{:05d}", "[0-9]" * 5)))
    if not files:
        raise ValueError(f"{path}: no student weights ({FROZEN_STUDENT_FILE.format(0)} ...)")
    return files


def read_student_state(checkpoint_format: str, path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The student weights of an engine checkpoint, full, on CPU, without a process group (export).

    ``model`` is the unsharded student (head stripped, as trained): it gives the keys and shapes to read.
    """
    if checkpoint_format == "safetensors":  # a student that was never trained (DeepSpeedEngine.freeze_student)
        from safetensors.torch import load_file

        return {k: v for f in frozen_student_files(path) for k, v in load_file(f).items()}
    if checkpoint_format == "dcp":
        import torch.distributed.checkpoint as dcp

        state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path, no_dist=True)  # only the "model" half: no optimizer state read
        return state["model"]
    if checkpoint_format == "deepspeed":
        from trainer.engines.deepspeed import read_fp32_student

        return read_fp32_student(path)
    raise ValueError(f"{path}: unknown engine checkpoint format {checkpoint_format!r}")


def build_engine(cfg: EngineConfig, optim: OptimConfig, env: DistEnv) -> Engine:
    """The engine named by ``engine.name``; libraries are imported only when chosen."""
    if cfg.name == "single":
        from trainer.engines.single import SingleEngine

        return SingleEngine(cfg, optim, env)
    if cfg.name == "fsdp":
        from trainer.engines.fsdp import FsdpEngine

        return FsdpEngine(cfg, optim, env)
    if cfg.name == "deepspeed":
        from trainer.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, optim, env)
    raise ValueError(f"engine.name: unknown engine {cfg.name!r}")
