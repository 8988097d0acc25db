"""Local refinement: after the closed-form refit, train a pruned MLP (every layer, not only the output Linear) by
Adam on its block's calibration tokens, so its output matches the target the refit aimed at (docs/compensation.md).

Tokens are independent through an MLP, so minibatches are drawn from all fit tokens of the block at once.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TokenPairs:
    """A block's calibration tokens for the MLP: its inputs, the wanted outputs and each token's weight."""

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def cat(cls, parts: list[TokenPairs]) -> TokenPairs:
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in ("inputs", "targets", "weights")))


def weighted_error(mlp: nn.Module, pairs: TokenPairs, channel_weights: torch.Tensor, chunk: int = 8192) -> float:
    """``sqrt(sum w ||c * (mlp(x) - y)||^2 / sum w ||c * y||^2)`` over the tokens (c: per-channel weights)."""
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, len(pairs.inputs), chunk):
            x, y, w = (t[i:i + chunk] for t in (pairs.inputs, pairs.targets, pairs.weights))
            num += float((w[:, None] * ((mlp(x) - y) * channel_weights).square()).sum())
            den += float((w[:, None] * (y * channel_weights).square()).sum())
    if den == 0:
        raise ValueError("refinement: the target output is zero on every token")
    return math.sqrt(num / den)


def refine_mlp(mlp: nn.Module, pairs: TokenPairs, channel_weights: torch.Tensor, *, steps: int, lr: float,
               batch_tokens: int, generator: torch.Generator, after: nn.Module | None = None) -> None:
    """Train ``mlp`` in place (fp32 copy, written back in its dtype) so ``after(mlp(inputs))`` matches the targets:
    Adam, cosine decay from ``lr`` over ``steps`` of ``batch_tokens`` tokens drawn from ``generator``. ``after``
    (a post-norm) is held fixed."""
    work = copy.deepcopy(mlp).float().train(False).requires_grad_(True)
    tail = nn.Identity() if after is None else copy.deepcopy(after).float().train(False).requires_grad_(False)
    x_all, y_all = pairs.inputs.float(), pairs.targets.float()
    w_all = pairs.weights.float()
    w_all = w_all / w_all.mean()
    c = channel_weights.float().square()
    scale = float((w_all[:, None] * y_all.square() * c).mean())  # the loss reads as a relative squared error
    if not scale > 0:
        raise ValueError("refinement: the target output is zero on every token")
    optimizer = torch.optim.Adam(work.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    with torch.enable_grad():  # callers prune under no_grad
        for _ in range(steps):
            idx = torch.randint(0, len(x_all), (batch_tokens,), generator=generator)
            loss = (w_all[idx, None] * (tail(work(x_all[idx])) - y_all[idx]).square() * c).mean() / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        for target, trained in zip(mlp.parameters(), work.parameters(), strict=True):
            target.copy_(trained.to(target.dtype))
