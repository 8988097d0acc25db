"""First-order Taylor importance of hidden units: sum over samples and tokens of |a * dL/da|.

``a`` is the input of the MLP's output Linear (the hidden units after the activation, or the
gated product), so the score is the loss change predicted by removing one unit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .sites import MlpSite, find_mlp_sites, out_inputs


def collect_taylor_scores(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    sites: list[MlpSite] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``loss_fn(model, batch)`` and backward on each batch; return float64 scores per site path.

    Parameter gradients are left as they were before the call.
    """
    sites = sites if sites is not None else find_mlp_sites(model)
    scores = {s.path: torch.zeros(s.hidden, dtype=torch.float64) for s in sites}
    saved_grads = {id(p): p.grad for p in model.parameters()}
    def receive(path: str, act: torch.Tensor) -> None:
        if not act.requires_grad:
            return

        def grad_hook(grad: torch.Tensor) -> None:
            contrib = (act.detach() * grad).abs().flatten(0, -2).sum(0)
            scores[path] += contrib.to(device="cpu", dtype=torch.float64)

        act.register_hook(grad_hook)

    try:
        with out_inputs(model, sites, receive), torch.enable_grad():
            for batch in batches:
                loss_fn(model, batch).backward()
    finally:
        for p in model.parameters():
            p.grad = saved_grads[id(p)]
    return scores
