"""Multinomial logistic regression on frozen features, fitted full-batch with L-BFGS (plain torch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> float:
    """Top-1 accuracy in [0, 1] on the test features of a probe fitted on the train features."""
    classes = int(max(train_labels.max().item(), test_labels.max().item()) + 1)
    probe = fit_linear_probe(train_features, train_labels, classes, weight_decay, max_iter)
    return (probe.predict(test_features) == test_labels.long()).float().mean().item()
