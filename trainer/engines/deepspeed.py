"""DeepSpeed ZeRO-2/3 for the student and a ZeRO-3, optimizer-less engine for the teacher.

The DeepSpeed JSON is generated from our config (``ds_config``), never written by hand. The
optimizer is torch AdamW passed as a client optimizer (DeepSpeedCPUAdam JIT-builds for ~70 s
on CPU). Gradient accumulation is DeepSpeed's own: ``backward`` runs engine.backward and
engine.step per micro-batch and DeepSpeed steps the optimizer at the boundary.

Checkpoints are DeepSpeed's ``save_checkpoint`` (tag ``ds``). ``load_checkpoint`` refuses another
data-parallel world size, so a resume at a new world size first converts the checkpoint once to
DeepSpeed's universal format (``deepspeed.checkpoint.ds_to_universal``, tag ``ds_universal``
beside it) and loads that with ``load_universal_checkpoint`` switched on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from trainer.config import EngineConfig, OptimConfig
from trainer.dist import DistEnv, init_process_group
from trainer.engines.base import Models, apply_hparams, make_adamw, param_groups
from trainer.engines.collectives import mean_over_ranks

TAG = "ds"
UNIVERSAL_TAG = "ds_universal"


def ds_config(cfg: EngineConfig, optim: OptimConfig, world_size: int, *, stage: int, train: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for the student (``train``) or the frozen teacher."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": optim.batch_size_per_rank,
        "gradient_accumulation_steps": optim.grad_accum_steps if train else 1,
        "train_batch_size": optim.batch_size_per_rank * world_size * (optim.grad_accum_steps if train else 1),
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if train:
        config["gradient_clipping"] = optim.grad_clip
        config["zero_allow_untested_optimizer"] = True
    return config


class DeepSpeedEngine:
    """Student: ZeRO ``engine.zero_stage`` with AdamW; teacher: ZeRO-3 partitioned parameters only."""

    def __init__(self, cfg: EngineConfig, optim: OptimConfig, env: DistEnv) -> None:
        self.cfg, self.optim_cfg, self.env = cfg, optim, env
        self.checkpoint_format = "deepspeed"
        init_process_group(env, cfg.dist_timeout_s)
        # DeepSpeed wraps the torch process group created above instead of making its own.
        deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo")
        deepspeed.utils.logger.setLevel(logging.WARNING)
        # DeepSpeed's comm layer calls deprecated torch collectives on every step.
        warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed",
                                category=FutureWarning)

    def setup(self, models: Models) -> None:
        if self.cfg.activation_checkpointing:
            models.enable_activation_checkpointing(models.student)
        optimizer = make_adamw(param_groups(models.student, 0.0), self.optim_cfg)
        world = self.env.world_size
        self.student_engine, self.optimizer, _, _ = deepspeed.initialize(
            model=models.student, optimizer=optimizer,
            config=ds_config(self.cfg, self.optim_cfg, world, stage=self.cfg.zero_stage, train=True))
        # A second engine without optimizer only partitions the teacher and gathers it per module.
        self.teacher_engine, _, _, _ = deepspeed.initialize(
            model=models.teacher, config=ds_config(self.cfg, self.optim_cfg, world, stage=3, train=False))
        self.teacher_engine.eval()
        self.dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32
        # Our per-group flags ("decays"), restored after a load: see restore_group_flags.
        self.group_flags = [{"decays": g["decays"]} for g in self.optimizer.param_groups]

    def student(self, images: torch.Tensor) -> object:
        return self.student_engine(images.to(self.env.device, self.dtype, non_blocking=True))

    def teacher(self, images: torch.Tensor) -> object:
        return self.teacher_engine(images.to(self.env.device, self.dtype, non_blocking=True))

    def autocast(self) -> AbstractContextManager:
        # DeepSpeed's bf16 mode holds bf16 parameters itself.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        self.student_engine.backward(loss)
        self.student_engine.step()

    def step(self) -> float:
        norm = self.student_engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def set_hparams(self, *, lr: float, weight_decay: float) -> None:
        apply_hparams(self.optimizer, lr=lr, weight_decay=weight_decay)

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return mean_over_ranks(values, self.env)

    def teacher_local_numel(self) -> int:
        return sum(p.ds_tensor.numel() for p in self.teacher_engine.module.parameters())

    def gather_teacher_state(self) -> dict[str, torch.Tensor]:
        """Full teacher parameters on every rank (a collective; tests and export)."""
        params = dict(self.teacher_engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {name: p.detach().cpu().clone() for name, p in params.items()}

    def gather_student_state(self) -> dict[str, torch.Tensor]:
        module = self.student_engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: v.detach().cpu().float().clone() for k, v in module.state_dict().items()}

    def save(self, path: Path) -> None:
        # Step, data and RNG live in the trainer's part of the checkpoint; the only client state is the
        # version record that ds_to_universal requires to convert this checkpoint later.
        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.student_engine.save_checkpoint(str(path), tag=TAG, client_state=info, save_latest=False)

    def load(self, path: Path, *, saved_world_size: int) -> None:
        tag = TAG
        if not (path / TAG).is_dir():
            raise ValueError(f"{path}: no DeepSpeed checkpoint (missing {path / TAG})")
        if saved_world_size != self.env.world_size:
            if self.env.is_main:
                convert_to_universal(path / TAG, path / UNIVERSAL_TAG)
            torch.distributed.barrier()
            # The switch is read from the engine's config at load time and has no per-call argument.
            self.student_engine._config.load_universal_checkpoint = True
            tag = UNIVERSAL_TAG
        try:
            loaded, _ = self.student_engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                            load_lr_scheduler_states=False)
        finally:
            self.student_engine._config.load_universal_checkpoint = False
        if loaded is None:
            raise ValueError(f"{path / tag}: DeepSpeed could not load this checkpoint")
        restore_group_flags(self.optimizer, self.group_flags)

    def close(self) -> None:
        self.student_engine.destroy()
        self.teacher_engine.destroy()


def restore_group_flags(optimizer: torch.optim.Optimizer, flags: list[dict[str, Any]]) -> None:
    """Repair what DeepSpeed's universal-checkpoint load (ZeRO-3) leaves wrong in the optimizer.

    It gives every param group the first group's settings (biases and norms would start to decay), and one
    shared ``step`` tensor to every group's state, which AdamW then increments once per group per step
    (wrong bias correction). Measured before the repair: 7e-4 relative loss drift one step after 2 -> 1 ranks.
    """
    if len(optimizer.param_groups) != len(flags):
        raise ValueError(f"optimizer has {len(optimizer.param_groups)} param groups after load, expected {len(flags)}")
    for group, own in zip(optimizer.param_groups, flags, strict=True):
        group.update(own)
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch AdamW inside DeepSpeed's ZeRO wrapper
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def read_fp32_student(path: Path, *, lazy: bool = False) -> dict[str, Any]:
    """Consolidated fp32 student weights of a ``save`` output (DeepSpeed's zero_to_fp32), no process group.

    ``lazy``: zero_to_fp32's lazy mode, values that gather one tensor on ``.contiguous()`` (export reads
    one block at a time with it).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (path / TAG).is_dir():
        raise ValueError(f"{path}: no DeepSpeed checkpoint (missing {path / TAG})")
    return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG, lazy_mode=lazy)


def convert_to_universal(source: Path, target: Path) -> None:
    """Run DeepSpeed's ds_to_universal once; written under a temporary name so a kill leaves no half copy."""
    if target.is_dir():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise ValueError(f"{source}: conversion to a universal checkpoint failed:\n{done.stderr[-3000:]}")
    tmp.rename(target)
