"""Data sources for the trainer: see base.BatchStream for the interface and build_stream for the factory."""

import dataclasses

from .base import Batch, BatchStream, InputSpec
from .config import DataConfig, SourceConfig
from .synthetic import SyntheticStream
from .wds_stream import WebDatasetStream

__all__ = [
    "Batch",
    "BatchStream",
    "DataConfig",
    "InputSpec",
    "SourceConfig",
    "SyntheticStream",
    "WebDatasetStream",
    "build_stream",
]


def build_stream(
    cfg: DataConfig, spec: InputSpec, *, batch_size: int, rank: int, world_size: int, seed: int
) -> BatchStream:
    """This rank's batch stream for ``cfg``; raises at once (ValueError/FileNotFoundError) on a bad shard spec.

    ``spec``: the teacher's input; ``cfg.image_size`` (when set) replaces its size.
    """
    if cfg.image_size:
        spec = dataclasses.replace(spec, image_size=cfg.image_size)
    if cfg.kind == "synthetic":
        return SyntheticStream(spec, batch_size, rank=rank, seed=seed)
    return WebDatasetStream(cfg, spec, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
