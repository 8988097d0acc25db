"""DeepSpeed ZeRO-2/3 for the student and a ZeRO-3, optimizer-less engine for the teacher.

The DeepSpeed JSON is generated from our config (``ds_config``), never written by hand. The
optimizer is torch AdamW passed as a client optimizer (DeepSpeedCPUAdam JIT-builds for ~70 s
on CPU). Gradient accumulation is DeepSpeed's own: ``backward`` runs engine.backward and
engine.step per micro-batch and DeepSpeed steps the optimizer at the boundary.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from contextlib import AbstractContextManager
from typing import Any

import deepspeed
import torch

from trainer.config import EngineConfig, OptimConfig
from trainer.dist import DistEnv, init_process_group
from trainer.engines.base import Models, apply_hparams, make_adamw, param_groups
from trainer.engines.collectives import mean_over_ranks


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

    def close(self) -> None:
        self.student_engine.destroy()
        self.teacher_engine.destroy()
