"""The data interface the training loop consumes; every source (synthetic, webdataset) implements it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class InputSpec:
    """What the teacher expects at its input; given by the model adapter."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class Batch:
    """One rank's batch: images [B, 3, H, W], captions and sample keys.

    Images are either normalised float32 (``spec`` None) or uint8 pixels with the ``spec`` to
    normalise them with; uint8 leaves the loader at a quarter of the bytes and is normalised on
    the training device (like timm's prefetch loader), so data workers never do float work.
    """

    images: torch.Tensor
    captions: list[str]
    keys: list[str]
    spec: InputSpec | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def model_input(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The normalised float32 images on ``device`` (default: where they are)."""
        images = self.images if device is None else self.images.to(device, non_blocking=True)
        return images if self.spec is None else normalise(images, self.spec)


def normalise(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 pixels [B, 3, H, W] (any strides) -> contiguous float32 with the teacher's mean/std.

    Loaders store pixels channels-last; the conversion to float writes the contiguous layout in
    the same pass, so the model sees exactly what a contiguous uint8 batch would give.
    """
    std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
    pixels = images.to(dtype=torch.float32, memory_format=torch.contiguous_format)
    return pixels.mul_(1.0 / (255.0 * std)).sub_(mean / std)


class BatchStream(Protocol):
    """An endless (or epoch-bounded) iterable of batches for one rank, resumable by state dict."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue the stream without replaying it from the start."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def counters(self) -> dict[str, int]:
        """Monotonic counters for monitoring, e.g. {'samples_skipped': 3}."""
        ...
