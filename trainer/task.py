"""DistillTask: a pruned student learns the frozen teacher's tokens before the final norm/head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import LossConfig
from trainer.models.base import TokenLayout


def freeze_teacher(teacher: nn.Module) -> None:
    """Eval mode and no gradients: the teacher is never trained, stored or differentiated."""
    teacher.eval()
    teacher.requires_grad_(False)


class DistillTask:
    """Runs teacher then student on the same images and returns the loss terms.

    ``student`` and ``teacher`` are the callables the engine made of the head-stripped models
    (sharded or not): both return [B, L, D] tokens from the last block, before the final norm.
    """

    def __init__(self, student: Callable[[torch.Tensor], torch.Tensor],
                 teacher: Callable[[torch.Tensor], torch.Tensor], *, student_layout: TokenLayout,
                 teacher_layout: TokenLayout, loss: LossConfig) -> None:
        self.student, self.teacher = student, teacher
        self.student_layout, self.teacher_layout = student_layout, teacher_layout
        self.cfg = loss

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'loss': weighted sum (with graph), 'loss_cls', 'loss_patch': detached terms}."""
        with torch.no_grad():
            target_cls, target_patch = self.teacher_layout.split(self.teacher(images))
        cls, patch = self.student_layout.split(self.student(images))
        loss_cls = F.mse_loss(cls.float(), target_cls.float())
        loss_patch = F.mse_loss(patch.float(), target_patch.float())
        loss = self.cfg.cls_weight * loss_cls + self.cfg.patch_weight * loss_patch
        return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_patch": loss_patch.detach()}
