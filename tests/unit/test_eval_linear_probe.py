"""Logistic-regression probe on frozen features: learns separable data, is deterministic."""

from __future__ import annotations

import pytest
import torch

from trainer.eval import fit_linear_probe, linear_probe_accuracy

pytestmark = pytest.mark.unit


def _linearly_separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g) * 3 + 5  # offset and scale: the probe must standardise
    w = torch.randn(3, 12, generator=torch.Generator().manual_seed(99))
    return x, (x @ w.T).argmax(dim=1)


def test_separable_data_is_learned():
    train_x, train_y = _linearly_separable(600, seed=0)
    test_x, test_y = _linearly_separable(300, seed=1)
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) > 0.95


def test_probe_is_deterministic_and_shaped():
    x, y = _linearly_separable(100, seed=2)
    a, b = fit_linear_probe(x, y, num_classes=4), fit_linear_probe(x, y, num_classes=4)
    assert a.logits(x).shape == (100, 4)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    # Class 3 never appears, so the probe must never predict it.
    assert not (a.predict(x) == 3).any()


def test_mismatched_labels_are_refused():
    x, y = _linearly_separable(10, seed=0)
    with pytest.raises(ValueError, match="labels"):
        fit_linear_probe(x, y[:5])
