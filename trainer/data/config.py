"""Typed, validated configuration of the training data source (plain types so YAML maps onto it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("synthetic", "webdataset")
AUGMENTS = ("none", "light")


@dataclass(frozen=True)
class SourceConfig:
    """One weighted source of shards, for mixing several datasets in resampled mode."""

    shards: str
    """Brace pattern (``/data/laion/{00000..41455}.tar``), ``pipe:`` URL, or a ``.txt`` file listing URLs."""

    weight: float = 1.0
    """Relative probability of drawing the next shard from this source (resampled mode only)."""

    def __post_init__(self) -> None:
        if not isinstance(self.shards, str) or not self.shards:
            raise ValueError("data.sources[].shards must be a non-empty string")
        if not self.weight > 0:
            raise ValueError(f"data.sources[].weight must be > 0, got {self.weight!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where training images come from and how they are streamed to each rank."""

    kind: str = "synthetic"
    """``synthetic`` (random tensors, for tests) or ``webdataset`` (tar shards)."""

    shards: str = ""
    """One source: brace pattern, ``pipe:`` URL, several joined by ``::``, or a ``.txt`` file of URLs."""

    sources: tuple[SourceConfig, ...] = field(default_factory=tuple)
    """Several weighted sources (list of ``{shards, weight}`` in YAML); use instead of ``shards``."""

    resampled: bool = False
    """Draw shards with replacement forever (each rank from all shards); the epoch is ``epoch_samples``."""

    epoch_samples: int = 0
    """Epoch length in samples summed over all ranks; required (> 0) when ``resampled``."""

    shuffle_buffer: int = 1000
    """Samples held in each worker's shuffle buffer; 0 disables sample shuffling."""

    num_workers: int = 2
    """DataLoader worker processes per rank; 0 decodes in the training process."""

    prefetch_batches: int = 2
    """Batches each worker prepares ahead of the training loop (DataLoader ``prefetch_factor``)."""

    augment: str = "none"
    """``none`` (center crop) or ``light`` (random resized crop of area 0.8-1.0 and horizontal flip)."""

    image_size: int = 0
    """Training images at this many px instead of the teacher's input size (0: the teacher's). Another size needs
    towers that take it, e.g. timm ViTs built with ``model.kwargs.dynamic_img_size: true`` (the position
    embedding is resampled per batch, the weights keep their size); validation stays at the teacher's size.
    Fewer tokens per image: a 224 px ViT/14 trained at 112 px runs about 4x the steps in the same time."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"data.kind must be one of {KINDS}, got {self.kind!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"data.augment must be one of {AUGMENTS}, got {self.augment!r}")
        # YAML gives a list of dicts; keep the frozen value hashable and typed.
        object.__setattr__(self, "sources", tuple(_as_source(s) for s in self.sources))
        for name in ("epoch_samples", "shuffle_buffer", "num_workers", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"data.{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.prefetch_batches, int) or self.prefetch_batches < 1:
            raise ValueError(f"data.prefetch_batches must be an integer >= 1, got {self.prefetch_batches!r}")
        if self.kind != "webdataset":
            return
        if bool(self.shards) == bool(self.sources):
            raise ValueError("data.shards or data.sources (exactly one) is required for kind=webdataset")
        if self.resampled and self.epoch_samples <= 0:
            raise ValueError("data.epoch_samples must be > 0 when data.resampled is true")
        if not self.resampled and self.epoch_samples > 0:
            raise ValueError(
                "data.epoch_samples needs data.resampled: true (otherwise an epoch is every shard once)"
            )
        if not self.resampled and any(s.weight != 1.0 for s in self.sources):
            raise ValueError("data.sources[].weight other than 1 needs data.resampled: true")

    def source_list(self) -> tuple[SourceConfig, ...]:
        """The sources as one list, whichever of ``shards`` / ``sources`` was given."""
        return self.sources if self.sources else (SourceConfig(self.shards),)


def _as_source(value: Any) -> SourceConfig:
    if isinstance(value, SourceConfig):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"shards", "weight"}
        if unknown:
            raise ValueError(f"data.sources[] has unknown keys {sorted(unknown)}")
        return SourceConfig(**value)
    raise ValueError(f"data.sources[] must be a mapping with 'shards' and 'weight', got {value!r}")
