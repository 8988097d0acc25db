"""Learning-rate and weight-decay schedules: pure functions of the global optimizer step."""

from __future__ import annotations

import math

COMPENSATED_WARMUP_FRACTION = 0.2
"""The warm-up share of the run when the student starts compensated and no warm-up is set (docs/demo.md: at
the demo's peak lr a 20 % warm-up keeps the held-out cosine near its start, a short one loses part of it)."""


def peak_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: base_lr is the lr for 256 images per step."""
    return base_lr * global_batch / 256


def lr_at(step: int, *, peak: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup to ``peak`` over ``warmup_steps`` (step 0 already > 0), then cosine towards
    ``min_lr_ratio * peak``, reached at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    floor = min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def weight_decay_at(step: int, *, start: float, end: float, total_steps: int) -> float:
    """Cosine from ``start`` at step 0 to ``end`` at the last step (``total_steps - 1``)."""
    progress = min(1.0, step / max(1, total_steps - 1))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def fraction_steps(fraction: float, total_steps: int) -> int:
    """``fraction`` of ``total_steps``, rounded; at least 1 step for a positive fraction and fewer than the run."""
    if fraction <= 0 or total_steps <= 1:
        return 0
    return min(total_steps - 1, max(1, round(fraction * total_steps)))


def warmup_steps_for(*, warmup_steps: int | None, warmup_fraction: float | None, total_steps: int,
                     compensated_start: bool) -> int:
    """The run's warm-up in steps: ``warmup_fraction`` of the run when set, else ``warmup_steps`` when set,
    else ``COMPENSATED_WARMUP_FRACTION`` of the run for a compensated start (the first steps at the peak lr
    would undo the closed-form compensation), else none."""
    if warmup_fraction is not None:
        return fraction_steps(warmup_fraction, total_steps)
    if warmup_steps is not None:
        return warmup_steps
    return fraction_steps(COMPENSATED_WARMUP_FRACTION, total_steps) if compensated_start else 0
