"""PyTorch FSDP2: ``fully_shard`` per transformer block, then the root, for student and teacher.

The teacher is sharded the same way and has no optimizer. bf16 uses a MixedPrecisionPolicy
(bf16 compute and all-gathers, fp32 gradient reduction) plus autocast, because some families
keep fp32 buffers that meet bf16 parameters in one op (timm Eva's k_bias).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from trainer.config import EngineConfig, OptimConfig
from trainer.dist import DistEnv, init_process_group
from trainer.engines.base import (
    Models,
    SkeletonModels,
    apply_hparams,
    dcp_load,
    dcp_save,
    local_numel,
    make_adamw,
    param_groups,
)
from trainer.engines.collectives import mean_over_ranks


class FsdpEngine:
    """FSDP2 on a 1-D mesh over all ranks (gloo on CPU, nccl on GPU)."""

    def __init__(self, cfg: EngineConfig, optim: OptimConfig, env: DistEnv) -> None:
        self.cfg, self.optim_cfg, self.env = cfg, optim, env
        self.checkpoint_format = "dcp"
        init_process_group(env, cfg.dist_timeout_s)

    def _shard(self, model: nn.Module, blocks: list[nn.Module]) -> nn.Module:
        policy = MixedPrecisionPolicy()
        if self.cfg.precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=policy)
        # The root last: it takes the parameters no block claimed (embeddings, final norm).
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        return model

    def setup(self, models: Models) -> None:
        self.mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        student, teacher = models.student.to(self.env.device), models.teacher.to(self.env.device)
        self._store_teacher(teacher)
        # Order: activation checkpointing wraps block internals first, then sharding wraps the blocks.
        if self.cfg.activation_checkpointing:
            models.enable_activation_checkpointing(student)
        self.student_model = self._shard(student, models.blocks(student))
        self.teacher_model = self._shard(teacher, models.blocks(teacher))
        self.build_optimizer()

    def _store_teacher(self, teacher: nn.Module) -> None:
        """Under bf16 the frozen teacher's parameters are stored in bf16: it has no optimizer, so no fp32 master
        copy is needed, and bf16 is what its compute casts them to anyway. Buffers keep their dtype."""
        if self.cfg.precision != "bf16":
            return
        for module in teacher.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False))

    def build_optimizer(self) -> None:
        """AdamW on the (sharded, possibly just pruned) student; ``setup`` calls it, in-engine pruning after."""
        self.params = [p for p in self.student_model.parameters() if p.requires_grad]
        self.optimizer = make_adamw(param_groups(self.student_model, 0.0), self.optim_cfg)

    # Sharded from skeletons (prune.in_engine): the models are sharded before they hold any value.

    def setup_sharded(self, models: SkeletonModels) -> None:
        """Shard both skeletons, then fill the shards: the teacher's rows from ``models.teacher_rows``, the
        student's ``shared`` tensors from the teacher's same shard."""
        self.mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        teacher, student = models.teacher, models.student
        self._store_teacher(teacher)
        if self.cfg.activation_checkpointing:
            models.enable_activation_checkpointing(student)
        for model in (teacher, student):
            # to_empty re-allocates buffers too: keep the real ones the skeleton build made.
            buffers = {name: b for name, b in model.named_buffers()}
            self._shard(model, models.blocks(model))
            model.to_empty(device=self.env.device)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
        self.teacher_model, self.student_model = teacher, student
        with torch.no_grad():
            for name, param in teacher.named_parameters():
                local, start = _local_rows(param, self.mesh)
                if local.numel():
                    local.copy_(models.teacher_rows(name, start, start + (local.shape[0] if local.dim() else 1)))
            teacher_params = dict(teacher.named_parameters())
            for name, param in student.named_parameters():
                if name in models.shared:
                    param.to_local().copy_(teacher_params[name].to_local())

    @contextlib.contextmanager
    def gather_teacher_module(self, path: str) -> Iterator[dict[str, torch.Tensor]]:
        module = self.teacher_model.get_submodule(path)
        full = {n: p.full_tensor() if isinstance(p, DTensor) else p.detach() for n, p in module.named_parameters()}
        yield {**full, **dict(module.named_buffers())}

    def write_student_tensors(self, path: str, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.student_model.get_submodule(path).named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                target = params[name]
                full = value.to(target.device, target.dtype)
                target.to_local().copy_(distribute_tensor(full, self.mesh, target.placements,
                                                          src_data_rank=None).to_local())

    def shard_numel(self) -> tuple[int, int]:
        return local_numel(self.teacher_model), local_numel(self.student_model)

    def teacher_module(self) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        def forward(images: torch.Tensor) -> object:
            # Under the engine's autocast, as in training: with bf16 parameters an fp32 buffer (timm Eva's
            # k_bias in the qkv bias) otherwise meets them in one op and the calibration forward fails.
            with self.autocast():
                return self.teacher(images)

        return self.teacher_model, forward

    def student(self, images: torch.Tensor) -> object:
        return self.student_model(images.to(self.env.device, non_blocking=True))

    def teacher(self, images: torch.Tensor) -> object:
        tokens = self.teacher_model(images.to(self.env.device, non_blocking=True))
        # FSDP2 keeps the root's parameters gathered after forward, expecting a backward; the teacher has none.
        assert isinstance(self.teacher_model, FSDPModule)
        self.teacher_model.reshard()
        return tokens

    def autocast(self) -> AbstractContextManager:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        # Reduce-scatter gradients only once per optimizer step; earlier micro-batches accumulate locally.
        assert isinstance(self.student_model, FSDPModule)
        self.student_model.set_requires_gradient_sync(last_micro_batch)
        (loss / self.optim_cfg.grad_accum_steps).backward()

    def step(self) -> torch.Tensor:
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def set_hparams(self, *, lr: float, weight_decay: float) -> None:
        apply_hparams(self.optimizer, lr=lr, weight_decay=weight_decay)

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return mean_over_ranks(values, self.env)

    def teacher_local_numel(self) -> int:
        return local_numel(self.teacher_model)

    def gather_teacher_state(self) -> dict[str, torch.Tensor]:
        """Full teacher parameters on every rank (a collective; tests and export)."""
        return {name: p.full_tensor().detach().cpu().clone() for name, p in self.teacher_model.named_parameters()}

    def gather_student_state(self) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
        return get_model_state_dict(self.student_model, options=options)

    def save(self, path: Path) -> None:
        dcp_save(self.student_model, self.optimizer, path)

    def load(self, path: Path, *, saved_world_size: int) -> None:
        dcp_load(self.student_model, self.optimizer, path)

    def close(self) -> None:
        pass


def _local_rows(param: torch.Tensor, mesh: object) -> tuple[torch.Tensor, int]:
    """(this rank's local tensor of an FSDP2 parameter, index of its first row in the full tensor)."""
    assert isinstance(param, DTensor) and all(isinstance(p, Shard) and p.dim == 0 for p in param.placements), param
    local = param.to_local()
    if param.dim() == 0 or local.numel() == 0:
        return local, 0
    # The rows DTensor gives this rank, asked of DTensor itself rather than recomputed.
    rows = distribute_tensor(torch.arange(param.shape[0], device=local.device), mesh, param.placements,
                             src_data_rank=None).to_local()
    return local, int(rows[0])
