"""Distillation objectives for one loss term (pooled token or patch tokens), and the teacher channel std.

Each objective compares student tokens ``s`` with teacher tokens ``t`` ([B, D] pooled or [B, P, D] patches,
taken before the final norm; ``norm_s`` / ``norm_t`` are each model's own final norm):
- ``mse``: mean (s - t)^2 before the final norm, the paper's; the default, and the one to prefer for
  EVA-style towers whose downstream heads read the pre-norm stream.
- ``mse_postnorm``: mean (norm_s(s) - norm_t(t))^2; prefer when users read normed features and a few
  pre-norm channels with huge magnitudes would otherwise dominate the squared error.
- ``cosine``: mean 1 - cos(norm_s(s), norm_t(t)) per token, after the final norm (what users consume,
  and what validation reports); prefer when only directions matter (retrieval, kNN, zero-shot).
- ``mse_standardized``: mean ((s - t) / std_t)^2 with std_t the teacher's running per-channel std of its
  pre-norm tokens; prefer when channel scales differ by orders of magnitude but the pre-norm space is wanted.

``hidden_term`` is the optional intermediate-block term (``loss.block_weight``, ``loss.blocks``): the tokens
leaving chosen blocks, matched to the teacher's by relative MSE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from trainer.config import LOSS_OBJECTIVES

POSTNORM = ("mse_postnorm", "cosine")
Norm = Callable[[torch.Tensor], torch.Tensor]
"""A model's final norm (an nn.Module or anything callable on tokens)."""
STD_FLOOR = 1e-6
"""Smallest std a channel is divided by: a constant teacher channel must not blow the loss up."""


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """All-reduce sum (a collective when a process group is up; the identity otherwise)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        values = values.clone()
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
    return values


class ChannelStd:
    """Cumulative per-channel mean and std of the teacher's pre-norm tokens over every token seen.

    Cumulative rather than an EMA: the teacher is frozen, so its token distribution does not move and
    the estimate only gets better. Sums are float64 and summed over ranks at each update, so every
    rank divides by the same std; ``state_dict`` goes into checkpoints so a resume stays exact.
    """

    def __init__(self) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, tokens: torch.Tensor) -> None:
        """Add every token of ``tokens`` [..., D] (of every rank: a collective under a process group)."""
        flat = tokens.detach().reshape(-1, tokens.shape[-1]).double()
        local = torch.cat([flat.sum(0), (flat * flat).sum(0), flat.new_tensor([flat.shape[0]])])
        total = sum_over_ranks(local)
        dim = flat.shape[1]
        if self.sum is None or self.sumsq is None:
            self.sum = torch.zeros(dim, dtype=torch.float64, device=flat.device)
            self.sumsq = torch.zeros(dim, dtype=torch.float64, device=flat.device)
        self.count = self.count.to(flat.device)
        self.sum, self.sumsq = self.sum.to(flat.device), self.sumsq.to(flat.device)
        self.sum += total[:dim]
        self.sumsq += total[dim:2 * dim]
        self.count += total[2 * dim]

    def std(self) -> torch.Tensor | None:
        """Population std per channel [D] (float32, at least STD_FLOOR); None before the first update."""
        if self.sum is None or self.sumsq is None or float(self.count) == 0:
            return None
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean * mean).clamp_min(0)
        return var.sqrt().clamp_min(STD_FLOOR).float()

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"count": _cpu(self.count), "sum": _cpu(self.sum), "sumsq": _cpu(self.sumsq)}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        count = state["count"]
        assert count is not None
        self.count, self.sum, self.sumsq = count.clone(), state["sum"], state["sumsq"]


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu().clone()


def term(objective: str, student: torch.Tensor, teacher: torch.Tensor, *, norm_s: Norm, norm_t: Norm,
         std: torch.Tensor | None, per_image: bool = False) -> torch.Tensor:
    """One loss term: a scalar (mean over every element or token), or [B] per-image means with ``per_image``.

    With equal token counts per image the mean of the per-image values equals the scalar, which is what
    lets validation sum per-image values over ranks and divide once.
    """
    s, t = student.float(), teacher.float()
    if objective == "mse":
        if not per_image:
            return F.mse_loss(s, t)  # exactly the loss before objectives were configurable
        return _per_image((s - t).square())
    if objective in POSTNORM:
        s, t = norm_s(s).float(), norm_t(t).float()
        if objective == "cosine":
            distance = 1 - F.cosine_similarity(s, t, dim=-1)  # [B] or [B, P]
            return _per_image(distance) if per_image else distance.mean()
    elif objective == "mse_standardized":
        scale = torch.ones(s.shape[-1], device=s.device) if std is None else std.to(s.device)
        s, t = s / scale, t / scale
    else:
        raise ValueError(f"loss objective must be one of {LOSS_OBJECTIVES}, got {objective!r}")
    squared = (s - t).square()
    return _per_image(squared) if per_image else squared.mean()


def hidden_term(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The hidden-state term of one block: mean (s - t)^2 / mean t^2 over every element (a scalar).

    Relative, so that blocks whose residual streams differ in scale by orders of magnitude weigh alike and one
    ``loss.block_weight`` fits any tower; the teacher's mean square is a constant of the batch (no gradient).
    """
    s, t = student.float(), teacher.float()
    return (s - t).square().mean() / t.square().mean().clamp_min(STD_FLOOR**2)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1).mean(1)
