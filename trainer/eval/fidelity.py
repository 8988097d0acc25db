"""How closely a student's tokens follow its teacher's: mean cosine of CLS and of patch tokens."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.eval.features import Features, ForwardFeatures
from trainer.eval.progress import progress


def token_fidelity(student: Features, teacher: Features) -> dict[str, float]:
    """``cls_cosine`` (mean over images) and ``patch_cosine`` (mean over all patch tokens) of stored features."""
    if student.cls.shape != teacher.cls.shape:
        raise ValueError(f"student.cls: shape {tuple(student.cls.shape)} != teacher {tuple(teacher.cls.shape)}")
    out = {"cls_cosine": F.cosine_similarity(student.cls.double(), teacher.cls.double(), dim=-1).mean().item()}
    if student.patches is not None and teacher.patches is not None:
        if student.patches.shape != teacher.patches.shape:
            raise ValueError(
                f"student.patches: shape {tuple(student.patches.shape)} != teacher {tuple(teacher.patches.shape)}"
            )
        cos = F.cosine_similarity(student.patches.double(), teacher.patches.double(), dim=-1)
        out["patch_cosine"] = cos.mean().item()
    return out


@torch.no_grad()
def model_fidelity(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[torch.Tensor],
    student_forward: ForwardFeatures,
    teacher_forward: ForwardFeatures | None = None,
    device: torch.device | str = "cpu",
    total_batches: int | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Fidelity on held-out batches without storing tokens: running sums of per-token cosines."""
    teacher_forward = teacher_forward or student_forward
    student.eval()
    teacher.eval()
    cls_sum = patch_sum = 0.0
    images = tokens = 0
    for batch in progress(batches, total_batches, "fidelity", enabled=show_progress):
        batch = batch.to(device, non_blocking=True)
        s_cls, s_patch = student_forward(student, batch)
        t_cls, t_patch = teacher_forward(teacher, batch)
        if s_patch.shape != t_patch.shape:
            raise ValueError(f"student patches {tuple(s_patch.shape)} != teacher patches {tuple(t_patch.shape)}")
        cls_sum += F.cosine_similarity(s_cls.double(), t_cls.double(), dim=-1).sum().item()
        patch_sum += F.cosine_similarity(s_patch.double(), t_patch.double(), dim=-1).sum().item()
        images += s_cls.shape[0]
        tokens += s_patch.shape[0] * s_patch.shape[1]
    if images == 0:
        raise ValueError("batches: no images to compare on")
    return {"cls_cosine": cls_sum / images, "patch_cosine": patch_sum / max(tokens, 1)}
