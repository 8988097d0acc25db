"""Logistic-regression probe on frozen features: learns separable data, is deterministic, validates its L2 strength."""

from __future__ import annotations

import pytest
import torch

from trainer.eval import choose_weight_decay, fit_linear_probe, fold_accuracies, linear_probe_accuracy

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


def _noisy_few_samples(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes whose means differ a little along every one of 100 noisy features: with few samples a weak L2
    fits the noise, a strong one keeps close to the difference of the means."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    return torch.randn(n, 100, generator=g) + 0.05 * (2 * y[:, None] - 1), y


def test_weight_decay_is_validated_on_train_features_only():
    train_x, train_y = _noisy_few_samples(200, seed=0)
    test_x, test_y = _noisy_few_samples(2000, seed=1)
    candidates = (1e-5, 1e-1)
    accuracy = fold_accuracies(train_x, train_y, candidates)
    assert set(accuracy) == set(candidates) and all(0 <= a <= 1 for a in accuracy.values())
    assert accuracy[1e-1] > accuracy[1e-5]
    chosen = choose_weight_decay(accuracy)
    assert chosen == 1e-1  # the strong one
    # It generalises better on data the choice never saw, and the default probe makes the same choice.
    weak = linear_probe_accuracy(train_x, train_y, test_x, test_y, weight_decay=1e-5)
    strong = linear_probe_accuracy(train_x, train_y, test_x, test_y, weight_decay=1e-1)
    assert strong > weak + 0.05
    # Deterministic, and independent of the test set.
    assert choose_weight_decay(fold_accuracies(train_x, train_y, candidates)) == chosen
    assert linear_probe_accuracy(train_x, train_y, test_x[:500], test_y[:500]) == linear_probe_accuracy(
        train_x, train_y, test_x[:500], test_y[:500], weight_decay=choose_weight_decay(fold_accuracies(train_x, train_y)))


def test_separable_data_keeps_a_weak_weight_decay():
    x, y = _linearly_separable(400, seed=3)
    assert choose_weight_decay(fold_accuracies(x, y, (1e-4, 10.0))) == 1e-4  # 10 shrinks the weights until classes blur


def test_bad_folds_are_refused():
    x, y = _linearly_separable(4, seed=0)
    with pytest.raises(ValueError, match="folds"):
        fold_accuracies(x, y, folds=5)
    with pytest.raises(ValueError, match="candidates"):
        fold_accuracies(x, y, ())
