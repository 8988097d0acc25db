"""Run a frozen model over image batches and collect its CLS/pooled features and, optionally, patch tokens.

Model-family knowledge stays in the ``forward_features`` adapter the caller passes in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from trainer.eval.progress import progress

ForwardFeatures = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``forward_features(model, images) -> (cls [B, D], patches [B, T, D])``."""


@dataclass
class Features:
    """Features of N images on CPU in float32: cls [N, D]; patches [N, T, D] or None when not kept."""

    cls: torch.Tensor
    patches: torch.Tensor | None


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    forward_features: ForwardFeatures,
    device: torch.device | str = "cpu",
    keep_patches: bool = False,
    total_batches: int | None = None,
    show_progress: bool = True,
) -> Features:
    """Features of every image in ``batches`` (already normalised); the model is put in eval mode."""
    model.eval()
    cls_parts, patch_parts = [], []
    for images in progress(batches, total_batches, "features", enabled=show_progress):
        cls, patches = forward_features(model, images.to(device, non_blocking=True))
        cls_parts.append(cls.float().cpu())
        if keep_patches:
            patch_parts.append(patches.float().cpu())
    if not cls_parts:
        raise ValueError("batches: no images to extract features from")
    return Features(torch.cat(cls_parts), torch.cat(patch_parts) if keep_patches else None)
