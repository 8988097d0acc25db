"""One process, plain torch: the debugging mode and the reference the sharded engines must match."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from trainer.config import EngineConfig, OptimConfig
from trainer.dist import DistEnv
from trainer.engines.base import (
    Models,
    apply_hparams,
    dcp_load,
    dcp_save,
    local_numel,
    make_adamw,
    param_groups,
)


class SingleEngine:
    """Models on one device, torch AdamW, bf16 by autocast."""

    def __init__(self, cfg: EngineConfig, optim: OptimConfig, env: DistEnv) -> None:
        if env.world_size != 1:
            raise ValueError(f"engine.name: 'single' runs one process, launched with WORLD_SIZE={env.world_size}")
        self.cfg, self.optim_cfg, self.env = cfg, optim, env
        self.checkpoint_format = "dcp"

    def setup(self, models: Models) -> None:
        if self.cfg.activation_checkpointing:
            models.enable_activation_checkpointing(models.student)
        self.student_model = models.student.to(self.env.device)
        self.teacher_model = models.teacher.to(self.env.device)
        self.params = [p for p in self.student_model.parameters() if p.requires_grad]
        self.optimizer = make_adamw(param_groups(self.student_model, 0.0), self.optim_cfg)

    def student(self, images: torch.Tensor) -> object:
        return self.student_model(images.to(self.env.device, non_blocking=True))

    def teacher(self, images: torch.Tensor) -> object:
        return self.teacher_model(images.to(self.env.device, non_blocking=True))

    def autocast(self) -> AbstractContextManager:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        (loss / self.optim_cfg.grad_accum_steps).backward()

    def step(self) -> torch.Tensor:
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def set_hparams(self, *, lr: float, weight_decay: float) -> None:
        apply_hparams(self.optimizer, lr=lr, weight_decay=weight_decay)

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def teacher_local_numel(self) -> int:
        return local_numel(self.teacher_model)

    def gather_teacher_state(self) -> dict[str, torch.Tensor]:
        """Full teacher parameters (copies)."""
        return {name: p.detach().cpu().clone() for name, p in self.teacher_model.named_parameters()}

    def gather_student_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.student_model.state_dict().items()}

    def save(self, path: Path) -> None:
        dcp_save(self.student_model, self.optimizer, path)

    def load(self, path: Path, *, saved_world_size: int) -> None:
        dcp_load(self.student_model, self.optimizer, path)

    def close(self) -> None:
        pass
