"""Weighted cosine kNN: perfect on separated clusters, exact on a hand-worked case."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.eval import knn_accuracy, knn_predict

pytestmark = pytest.mark.unit


def _clusters(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(4, 16) * 10  # four orthogonal directions
    labels = torch.arange(4).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(labels.shape[0], 16, generator=g), labels


def test_separable_clusters_are_classified_perfectly():
    train_x, train_y = _clusters(30, seed=0)
    test_x, test_y = _clusters(10, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20) == 1.0


def test_weighting_beats_the_majority_in_a_worked_case():
    # Query along x. One class-0 point at cosine 1, two class-1 points at cosine 0.6.
    # Plain majority of k=3 says 1; weights exp(1/T) vs 2*exp(0.6/T) with T=0.07 say 0.
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[2.0, 0.0]])
    assert math.exp(1 / 0.07) > 2 * math.exp(0.6 / 0.07)
    assert knn_predict(train, labels, query, k=3, temperature=0.07).tolist() == [0]
    # With a hot temperature the weights flatten and the two class-1 neighbours win.
    assert knn_predict(train, labels, query, k=3, temperature=100.0).tolist() == [1]


def test_chunking_does_not_change_predictions():
    train_x, train_y = _clusters(15, seed=2)
    test_x, _ = _clusters(7, seed=3)
    whole = knn_predict(train_x, train_y, test_x, k=5)
    assert torch.equal(whole, knn_predict(train_x, train_y, test_x, k=5, chunk_size=3))


def test_bad_arguments_name_the_field():
    x, y = _clusters(2, seed=0)
    with pytest.raises(ValueError, match="k:"):
        knn_predict(x, y, x, k=100)
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(x, y[:-1], x, k=2)
