"""Learning-rate and weight-decay schedules: pure functions of the global optimizer step."""

from __future__ import annotations

import math


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
