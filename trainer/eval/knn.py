"""Weighted k-nearest-neighbour classification on cosine similarity, as DINO evaluates frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Labels [M] for test features [M, D]: each of the k nearest train rows votes exp(cosine / temperature)."""
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(f"train_labels: {train_labels.shape[0]} labels for {train_features.shape[0]} features")
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k: must be in [1, {train_features.shape[0]}], got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    classes = int(num_classes if num_classes is not None else train_labels.max().item() + 1)
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    out = []
    # Chunks bound the [chunk, N_train] similarity matrix (10k x 60k floats would be 2.4 GB).
    for test in F.normalize(test_features.float(), dim=1).split(chunk_size):
        sim, idx = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(test.shape[0], classes)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        out.append(votes.argmax(dim=1))
    return torch.cat(out)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in [0, 1] of ``knn_predict`` on labelled test features."""
    classes = int(max(train_labels.max().item(), test_labels.max().item()) + 1)
    pred = knn_predict(train_features, train_labels, test_features, k, temperature, classes)
    return (pred == test_labels.long()).float().mean().item()
