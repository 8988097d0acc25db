"""Schedules are pure functions of the step: exact values at the ends and after warmup."""

from __future__ import annotations

import pytest

from trainer.schedule import (
    COMPENSATED_WARMUP_FRACTION,
    fraction_steps,
    lr_at,
    peak_lr,
    warmup_steps_for,
    weight_decay_at,
)

pytestmark = pytest.mark.unit


def test_peak_lr_scales_linearly_with_global_batch() -> None:
    assert peak_lr(6e-5, 256) == pytest.approx(6e-5)
    assert peak_lr(6e-5, 40 * 8) == pytest.approx(6e-5 * 320 / 256)


def test_warmup_is_linear_then_cosine_decays_to_floor() -> None:
    kwargs = dict(peak=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, **kwargs) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, **kwargs) == pytest.approx(1.0)
    assert lr_at(9, **kwargs) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_at(14, **kwargs) == pytest.approx(0.1)
    values = [lr_at(s, **kwargs) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_no_warmup_starts_at_peak() -> None:
    assert lr_at(0, peak=2.0, warmup_steps=0, total_steps=10) == pytest.approx(2.0)


def test_weight_decay_goes_from_start_to_end() -> None:
    kwargs = dict(start=0.04, end=0.2, total_steps=11)
    assert weight_decay_at(0, **kwargs) == pytest.approx(0.04)
    assert weight_decay_at(5, **kwargs) == pytest.approx(0.12)
    assert weight_decay_at(10, **kwargs) == pytest.approx(0.2)
    assert weight_decay_at(0, start=0.04, end=0.2, total_steps=1) == pytest.approx(0.04)


def test_fraction_steps_rounds_keeps_one_step_and_leaves_the_last() -> None:
    assert fraction_steps(0.2, 120) == 24 and fraction_steps(0.2, 18) == 4
    assert fraction_steps(0.2, 2) == 1  # at least one step...
    assert fraction_steps(0.9, 3) == 2  # ...and fewer than the run
    assert fraction_steps(0.2, 1) == 0 and fraction_steps(0.0, 100) == 0


def test_compensated_start_warms_up_over_a_fifth_unless_told_otherwise() -> None:
    def warmup(steps: int | None = None, fraction: float | None = None, compensated: bool = True) -> int:
        return warmup_steps_for(warmup_steps=steps, warmup_fraction=fraction, total_steps=100,
                                compensated_start=compensated)

    assert COMPENSATED_WARMUP_FRACTION == 0.2 and warmup() == 20
    assert warmup(compensated=False) == 0  # a plain pruned start keeps the configured schedule
    assert warmup(steps=5) == 5 and warmup(steps=5, compensated=False) == 5  # set by hand: kept
    assert warmup(fraction=0.1) == 10 and warmup(fraction=0.1, compensated=False) == 10
    assert warmup(fraction=0.0) == 0 and warmup(steps=0) == 0  # the ways to turn the default off
