"""Multinomial logistic regression on frozen features, fitted full-batch with L-BFGS (plain torch).

The L2 strength is validated, not fixed (the usual linear-evaluation protocol): ``choose_weight_decay`` picks it
by its k-fold accuracy on the train features alone (``fold_accuracies``). A fixed weak one (1e-4, the probe's until session 10) overfits
3,000 samples of 384 good features: the demo's teacher and compensated and recovered students gained 1.0-2.7
points with the validated one (docs/demo.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
"""L2 strengths (on standardised features) that ``fold_accuracies`` tries by default."""
FOLDS = 5


@dataclass
class LinearProbe:
    """A fitted probe: features are standardised with (mean, std), then ``weight @ x + bias``."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores [N, C] for features [N, D]."""
        return ((features.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted labels [N]."""
        return self.logits(features).argmax(dim=1)


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> LinearProbe:
    """Fit cross-entropy + L2 on standardised features; deterministic (zero init, full batch)."""
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"labels: {labels.shape[0]} labels for features of shape {tuple(features.shape)}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
    classes = int(num_classes if num_classes is not None else labels.max().item() + 1)
    x = features.float()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    x = (x - mean) / std
    y = labels.long()
    weight = torch.zeros(classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def fold_accuracies(
    features: torch.Tensor,
    labels: torch.Tensor,
    candidates: Sequence[float] = WEIGHT_DECAYS,
    folds: int = FOLDS,
    seed: int = 0,
    max_iter: int = 200,
) -> dict[float, float]:
    """Each L2 strength's ``folds``-fold accuracy in [0, 1] on these (train) features; the folds are a seeded
    permutation, so the result is deterministic."""
    if not candidates:
        raise ValueError("candidates: no weight decay to choose from")
    if folds < 2 or features.shape[0] < folds:
        raise ValueError(f"folds: need 2 <= folds <= samples, got {folds} folds for {features.shape[0]} samples")
    classes = int(labels.max().item() + 1)
    order = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
    correct = dict.fromkeys(candidates, 0)
    for held in order.chunk(folds):
        fit = torch.ones(features.shape[0], dtype=torch.bool)
        fit[held] = False
        for wd in candidates:
            probe = fit_linear_probe(features[fit], labels[fit], classes, wd, max_iter)
            correct[wd] += int((probe.predict(features[held]) == labels[held].long()).sum())
    return {wd: hits / features.shape[0] for wd, hits in correct.items()}


def choose_weight_decay(accuracy: Mapping[float, float]) -> float:
    """The L2 strength with the best ``fold_accuracies``; ties go to the stronger."""
    return max(accuracy, key=lambda wd: (accuracy[wd], wd))


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decay: float | None = None,
    max_iter: int = 200,
) -> float:
    """Top-1 accuracy in [0, 1] on the test features of a probe fitted on the train features. ``weight_decay``:
    None chooses it on the train features (``fold_accuracies``; the test features are never seen)."""
    if weight_decay is None:
        weight_decay = choose_weight_decay(fold_accuracies(train_features, train_labels, max_iter=max_iter))
    classes = int(max(train_labels.max().item(), test_labels.max().item()) + 1)
    probe = fit_linear_probe(train_features, train_labels, classes, weight_decay, max_iter)
    return (probe.predict(test_features) == test_labels.long()).float().mean().item()
