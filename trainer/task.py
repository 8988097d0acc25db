"""DistillTask: a pruned student learns the frozen teacher's tokens; the objectives are in trainer/losses.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import LossConfig
from trainer.losses import ChannelStd, hidden_term, term
from trainer.models.base import TokenLayout


def freeze_teacher(teacher: nn.Module) -> None:
    """Eval mode and no gradients: the teacher is never trained, stored or differentiated."""
    teacher.eval()
    teacher.requires_grad_(False)


def _frozen_norm(norm: nn.Module | None, device: torch.device | str | None) -> nn.Module:
    # The final norm left the model with strip_head: training never updates it (export puts the
    # teacher's back), so gradients must not pile up in it either.
    norm = nn.Identity() if norm is None else norm
    norm.requires_grad_(False).eval()
    return norm if device is None else norm.to(device)


class _LazyNorm:
    """The final norm, frozen and moved to the device at its first use: the default objective never uses it."""

    def __init__(self, norm: nn.Module | None, device: torch.device | str | None) -> None:
        self.source, self.device = norm, device
        self.ready: nn.Module | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.ready is None:
            self.ready = _frozen_norm(self.source, self.device)
        return self.ready(x)


class BlockTaps:
    """Forward hooks that keep the outputs of chosen blocks while armed (the hidden-state term).

    Hooks rather than a second forward: the engines' own hooks (FSDP unsharding, DeepSpeed gathering) and
    activation checkpointing stay as they are, and disarmed taps (validation, backward recomputation) keep
    nothing.
    """

    def __init__(self, blocks: list[nn.Module], indices: tuple[int, ...]) -> None:
        for i in indices:
            if not -len(blocks) <= i < len(blocks):
                raise ValueError(f"loss.blocks: index {i} is outside the model's {len(blocks)} blocks")
        self.outputs: dict[int, torch.Tensor] = {}
        self.armed_now = False
        self.order = [i % len(blocks) for i in indices]
        for i in sorted(set(self.order)):
            blocks[i].register_forward_hook(self._keeper(i))

    def _keeper(self, index: int) -> Callable[..., None]:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            if self.armed_now:
                self.outputs[index] = output[0] if isinstance(output, tuple) else output
        return keep

    @contextmanager
    def armed(self) -> Iterator[None]:
        """Keep the chosen blocks' outputs of the forward run inside this block (earlier ones are dropped)."""
        self.outputs, self.armed_now = {}, True
        try:
            yield
        finally:
            self.armed_now = False

    def take(self) -> list[torch.Tensor]:
        """The kept outputs in ``indices`` order, forgotten here."""
        missing = [i for i in self.order if i not in self.outputs]
        assert not missing, f"blocks {missing} did not run in the armed forward"
        outputs, self.outputs = [self.outputs[i] for i in self.order], {}
        return outputs


class DistillTask:
    """Runs teacher then student on the same images and returns the loss terms.

    ``student`` and ``teacher`` are the callables the engine made of the head-stripped models
    (sharded or not): both return [B, L, D] tokens from the last block, before the final norm.
    ``student_norm`` / ``teacher_norm`` are each model's own final norm (``adapter.final_norm``),
    used by the post-norm objectives and by ``evaluate``; missing ones are identities.
    ``student_blocks`` / ``teacher_blocks``: each model's transformer blocks (``adapter.blocks``), needed for
    the hidden-state term (``loss.block_weight`` > 0).
    """

    def __init__(self, student: Callable[[torch.Tensor], torch.Tensor],
                 teacher: Callable[[torch.Tensor], torch.Tensor], *, student_layout: TokenLayout,
                 teacher_layout: TokenLayout, loss: LossConfig, student_norm: nn.Module | None = None,
                 teacher_norm: nn.Module | None = None, device: torch.device | str | None = None,
                 student_blocks: list[nn.Module] | None = None, teacher_blocks: list[nn.Module] | None = None) -> None:
        self.student, self.teacher = student, teacher
        self.student_layout, self.teacher_layout = student_layout, teacher_layout
        self.cfg = loss
        self.student_norm, self.teacher_norm = _LazyNorm(student_norm, device), _LazyNorm(teacher_norm, device)
        self.teacher_std = ChannelStd()
        self.uses_std = "mse_standardized" in (loss.cls_objective, loss.patch_objective)
        self.taps: tuple[BlockTaps, BlockTaps] | None = None
        if loss.block_weight > 0:
            if student_blocks is None or teacher_blocks is None:
                raise ValueError("loss.block_weight: the task was given no blocks to match")
            if len(student_blocks) != len(teacher_blocks):
                raise ValueError(f"loss.blocks: the student has {len(student_blocks)} blocks, the teacher "
                                 f"{len(teacher_blocks)}: block outputs cannot be paired")
            self.taps = (BlockTaps(student_blocks, loss.blocks), BlockTaps(teacher_blocks, loss.blocks))

    def _terms(self, cls: torch.Tensor, patch: torch.Tensor, target_cls: torch.Tensor, target_patch: torch.Tensor,
               per_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
        std = self.teacher_std.std() if self.uses_std else None
        norms = {"norm_s": self.student_norm, "norm_t": self.teacher_norm, "std": std, "per_image": per_image}
        return (term(self.cfg.cls_objective, cls, target_cls, **norms),
                term(self.cfg.patch_objective, patch, target_patch, **norms))

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'loss': weighted sum (with graph), 'loss_cls', 'loss_patch', 'loss_blocks': detached terms}
        ('loss_blocks' is 0 without the hidden-state term)."""
        with torch.no_grad(), self._tapping(1):
            target = self.teacher(images)
            if self.uses_std:  # before the loss: the first batch already has a std to divide by
                self.teacher_std.update(target)
            target_cls, target_patch = self.teacher_layout.split(target)
        with self._tapping(0):
            cls, patch = self.student_layout.split(self.student(images))
        loss_cls, loss_patch = self._terms(cls, patch, target_cls, target_patch, per_image=False)
        loss = self.cfg.cls_weight * loss_cls + self.cfg.patch_weight * loss_patch
        loss_blocks = torch.zeros((), device=loss.device)
        if self.taps is not None:
            pairs = zip(self.taps[0].take(), self.taps[1].take(), strict=True)
            loss_blocks = torch.stack([hidden_term(s, t) for s, t in pairs]).mean()
            loss = loss + self.cfg.block_weight * loss_blocks
        return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_patch": loss_patch.detach(),
                "loss_blocks": loss_blocks.detach()}

    @contextmanager
    def _tapping(self, which: int) -> Iterator[None]:
        """Arm the student's (0) or the teacher's (1) block taps for one forward, if there are any."""
        if self.taps is None:
            yield
            return
        with self.taps[which].armed():
            yield

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image [B] values on held-out images, nothing updated: loss terms, post-norm cosines, features.

        'cos_cls': cosine of the normed pooled tokens; 'cos_patch': mean over the image's patch tokens of
        the normed tokens' cosine; 'features' / 'teacher_features': the normed pooled tokens [B, D].
        """
        t_cls, t_patch = self.teacher_layout.split(self.teacher(images))
        s_cls, s_patch = self.student_layout.split(self.student(images))
        loss_cls, loss_patch = self._terms(s_cls, s_patch, t_cls, t_patch, per_image=True)
        n_s_cls, n_t_cls = self.student_norm(s_cls.float()).float(), self.teacher_norm(t_cls.float()).float()
        n_s_patch, n_t_patch = self.student_norm(s_patch.float()), self.teacher_norm(t_patch.float())
        return {
            "loss_cls": loss_cls.double(), "loss_patch": loss_patch.double(),
            "cos_cls": F.cosine_similarity(n_s_cls.double(), n_t_cls.double(), dim=-1),
            "cos_patch": F.cosine_similarity(n_s_patch.double(), n_t_patch.double(), dim=-1).mean(1),
            "features": n_s_cls, "teacher_features": n_t_cls,
        }

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs beyond the engine's state: the teacher channel statistics."""
        return {"teacher_std": self.teacher_std.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher_std.load_state_dict(state["teacher_std"])
