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
    """One rank's batch: normalised images [B, 3, H, W] float32, captions and sample keys."""

    images: torch.Tensor
    captions: list[str]
    keys: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]


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
