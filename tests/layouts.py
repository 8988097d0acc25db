"""Tiny models of every MLP layout the pruning package supports, shared by the pruning tests."""

from __future__ import annotations

import torch
from open_clip.transformer import VisionTransformer as OpenClipViT
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from pruning.sites import GATED_FUSED, GATED_SPLIT, PLAIN

KINDS = ["open_clip", "timm_vit", "eva_plain", "eva_swiglu", "eva_glu_fused", "dinov2_w12"]


class Dinov2SwiGLUFFN(nn.Module):
    """DINOv2's fused SwiGLU layout: w12 holds [gate; value] rows, w3 projects back."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(nn.functional.silu(gate) * value)


class TinyDinov2Blocks(nn.Module):
    """Residual stack of DINOv2 SwiGLU MLPs on [B, T, dim] tokens."""

    def __init__(self, dim: int = 32, hidden: int = 48, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Dinov2SwiGLUFFN(dim, hidden) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def tiny_model(kind: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """(2-block model of one layout, the shape of one input batch, its MLP layout); seeded."""
    torch.manual_seed(0)
    common = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    image = (2, 3, 32, 32)
    if kind == "open_clip":
        return (OpenClipViT(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0,
                            output_dim=32), image, PLAIN)
    if kind == "timm_vit":
        return TimmViT(**common), image, PLAIN
    if kind == "eva_plain":
        return Eva(**common, mlp_ratio=4.0), image, PLAIN
    if kind == "eva_swiglu":
        return Eva(**common, swiglu_mlp=True, scale_mlp=False, swiglu_align_to=8), image, GATED_SPLIT
    if kind == "eva_glu_fused":
        return Eva(**common, swiglu_mlp=True, scale_mlp=False), image, GATED_FUSED
    if kind == "dinov2_w12":
        return TinyDinov2Blocks(), (2, 5, 32), GATED_FUSED
    raise AssertionError(kind)
