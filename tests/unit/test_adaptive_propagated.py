"""``bench.adaptive_propagated.propagation_gains``: the reach of each block's change into the tower's output."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

import pruning
from bench.adaptive_propagated import propagation_gains

pytestmark = pytest.mark.unit


def setup() -> tuple[TimmViT, dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0,
                    init_values=0.3).eval()
    orders = {s.path: torch.randperm(s.hidden) for s in pruning.find_mlp_sites(model)}
    return model, orders, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_the_last_block_reaches_an_output_without_final_norm_one_to_one() -> None:
    model, orders, images = setup()
    model.norm = nn.Identity()  # the tower's output is the last block's output
    gains = propagation_gains(model, orders, 32, images)
    assert gains[-1] == pytest.approx(1.0, rel=1e-5)
    assert all(g > 0 for g in gains)


def test_gains_are_first_order_in_the_step() -> None:
    model, orders, images = setup()
    small, double = (propagation_gains(model, orders, 32, images, alpha=a) for a in (0.005, 0.01))
    for a, b in zip(small, double, strict=True):
        assert a == pytest.approx(b, rel=0.05)
