"""Turn uint8 image arrays (grayscale or RGB) into normalised model batches at the model's input size."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from trainer.data.base import InputSpec


def image_batches(images: torch.Tensor, spec: InputSpec, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield float32 [b, 3, S, S] batches from uint8 [N, H, W] or [N, H, W, 3]; resized bilinearly per batch."""
    if images.dtype != torch.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"images: expected uint8 [N, H, W] or [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].float() / 255
        chunk = chunk[:, None].expand(-1, 3, -1, -1) if chunk.ndim == 3 else chunk.permute(0, 3, 1, 2)
        # Resizing per batch keeps memory at one batch: 70k Fashion-MNIST images at 224 px would be ~42 GB.
        chunk = F.interpolate(chunk, size=(spec.image_size, spec.image_size), mode="bilinear", align_corners=False)
        yield ((chunk - mean) / std).contiguous()
