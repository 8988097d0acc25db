"""``bench.adaptive_fisher``: its curves come from the product's statistics, its curvature is diag(J^T J)."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

import pruning
from bench.adaptive_fisher import curvature, curves
from bench.compensation import forward_features

pytestmark = pytest.mark.unit


def tower(size: int = 32, width: int = 32) -> TimmViT:
    torch.manual_seed(0)
    return TimmViT(img_size=size, patch_size=8, embed_dim=width, depth=2, num_heads=2, num_classes=0,
                   init_values=0.3).eval()


def test_curves_with_layerscale_weights_are_the_products_up_to_each_blocks_energy() -> None:
    model = tower()
    batches = list(torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1)).split(6))
    calibration = pruning.Calibration()
    budget = pruning.Budget(ratio=1.0, grid=8)
    plan = pruning.plan_widths(pruning.ModelSource(model, forward_features), budget, calibration=calibration,
                               calib_inputs=batches)
    widths = budget.candidates(128, 32)
    layerscale = [b.ls2.gamma.detach().double().square() for b in model.blocks]
    mine = curves(model, batches, plan.orders, widths, layerscale, calibration.ridge, calibration.holdout_fraction)
    for curve in mine:
        ratio = torch.tensor(curve.errors) / torch.tensor(plan.summary["curves"][curve.path]["errors"])
        assert ratio.min() > 1.0  # the product divides by the block's output energy
        assert ratio.max() / ratio.min() == pytest.approx(1.0, abs=1e-5)


def test_curvature_estimates_the_gauss_newton_diagonal() -> None:
    model = tower(size=16, width=16)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    estimate = curvature(model, images, 400, torch.Generator().manual_seed(3))
    # Exact: one backward per final-token coordinate, summing the squared gradients at every MLP output.
    outputs = {}

    def keep(i: int):
        def hook(_m, _a, y):
            y.retain_grad()
            outputs[i] = y
        return hook

    handles = [b.mlp.fc2.register_forward_hook(keep(i)) for i, b in enumerate(model.blocks)]
    tokens = forward_features(model.requires_grad_(False), images.clone().requires_grad_(True))
    for h in handles:
        h.remove()
    direction = tokens / tokens.norm(dim=-1, keepdim=True)
    n_tok = direction.shape[1]
    exact = [torch.zeros(16, dtype=torch.float64) for _ in outputs]
    for t in range(n_tok):
        weight = 0.5 if t == 0 else 0.5 / (n_tok - 1)
        for d in range(direction.shape[2]):
            for y in outputs.values():
                y.grad = None
            direction[:, t, d].sum().backward(retain_graph=True)
            for i, y in outputs.items():
                exact[i] += weight * y.grad.double().square().reshape(-1, 16).mean(0)
    for got, want in zip(estimate, exact, strict=True):
        assert torch.allclose(got, want, rtol=0.2, atol=0.02 * float(want.max()))
