"""``bench.weight_average``: the weights given to saved checkpoints and their weighted mean."""

from __future__ import annotations

import pytest
import torch

from bench.weight_average import candidates, weighted_average


def test_candidate_weights() -> None:
    states = [(20, {}), (40, {}), (60, {})]
    got = candidates(states, uniform=[2, 3, 5], half_lives=[20])
    assert got["final"] == [0.0, 0.0, 1.0]
    assert got["uniform_last_2"] == [0.0, 1.0, 1.0]
    assert got["uniform_last_3"] == [1.0, 1.0, 1.0]
    assert "uniform_last_5" not in got  # more than the saved checkpoints
    assert got["ema_half_life_20"] == pytest.approx([0.25, 0.5, 1.0])


def test_weighted_average_of_floats_keeps_integers_of_the_last() -> None:
    states = [(1, {"w": torch.tensor([0.0, 3.0]), "n": torch.tensor([1])}),
              (2, {"w": torch.tensor([3.0, 0.0]), "n": torch.tensor([7])})]
    avg = weighted_average(states, [1.0, 2.0])
    assert torch.equal(avg["w"], torch.tensor([2.0, 1.0]))
    assert avg["w"].dtype == torch.float32
    assert torch.equal(avg["n"], torch.tensor([7]))
