"""``bench.adaptive_selected.banded``: the plan's allocation with every width inside a band."""

from __future__ import annotations

import pytest

import pruning
from bench.adaptive_selected import banded

pytestmark = pytest.mark.unit


def test_banded_allocation_stays_in_the_band_and_spends_the_units() -> None:
    widths = [64, 128, 192, 256, 320]
    # Block a gains a lot from width, block b nothing: unconstrained, a takes the most and b the least.
    curves = {"a": {"widths": widths, "errors": [10.0, 6.0, 3.0, 1.0, 0.0]},
              "b": {"widths": widths, "errors": [1.0, 1.0, 1.0, 1.0, 1.0]}}
    plan = pruning.WidthPlan([320, 64], {}, {"curves": curves, "uniform_units": 384})
    assert banded(plan, 64, 320) == [320, 64]
    assert banded(plan, 128, 256) == [256, 128]
    assert banded(plan, 192, 192) == [192, 192]
