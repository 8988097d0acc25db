"""Test shorthands over the one driver, ``pruning.prune_blocks``, for a model in memory.

They keep the tests short and read like the equivalences they check; every call goes through
``prune_blocks(ModelSource(model), ...)``, the path the demo and the host trainer use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from pruning import (
    BlockState,
    Calibration,
    ModelSource,
    PruneReport,
    keep_counts,
    prune_blocks,
)


def prune_model(model: nn.Module, *, ratio: float | None = None, num_keep: int | Mapping[str, int] | None = None,
                method: str = "diversity", generator: torch.Generator | None = None,
                scores: dict[str, torch.Tensor] | None = None) -> PruneReport:
    """Prune every MLP of ``model`` in place, no compensation."""
    source = ModelSource(model)
    return prune_blocks(source, keep_counts(source.sites, ratio, num_keep), method, generator=generator,
                        scores=scores)


def prune_and_compensate(model: nn.Module, batches: Iterable, forward: Callable | None = None, *,
                         ratio: float | None = None, num_keep: int | Mapping[str, int] | None = None,
                         method: str = "diversity", ridge: float = 1e-3,
                         holdout_fraction: float = 0.2, generator: torch.Generator | None = None,
                         scores: dict[str, torch.Tensor] | None = None, balance_prefix: bool = False) -> PruneReport:
    """Prune and compensate every MLP of a tower of blocks in place, on calibration image batches
    (or recorded ``BlockState``s); ``forward(model, images)`` runs the tower (default ``model(images)``)."""
    source = ModelSource(model, forward)
    calibration = Calibration(ridge=ridge, holdout_fraction=holdout_fraction, balance_prefix=balance_prefix)
    inputs: list[torch.Tensor | BlockState] = list(batches)
    return prune_blocks(source, keep_counts(source.sites, ratio, num_keep), method, calibration=calibration,
                        calib_inputs=inputs, generator=generator, scores=scores)


# The former in-memory entry points took recorded states or image batches alike: one helper serves both.
calibrate_blocks = prune_and_compensate_blocks = prune_and_compensate


def prune_checkpoint(model: str, out_dir, *, calibration=None, num_calib: int = 256, ridge: float = 1e-3, calib_batch_size: int = 16, holdout_fraction: float = 0.2,
                     balance_prefix: bool = False, **kwargs) -> PruneReport:
    """``pruning.prune_checkpoint`` with the calibration settings as keywords (``calibration``: the images)."""
    import pruning

    settings = None
    if calibration is not None:
        settings = Calibration(ridge=ridge, holdout_fraction=holdout_fraction,
                               balance_prefix=balance_prefix, num_images=num_calib, batch_size=calib_batch_size)
    return pruning.prune_checkpoint(model, out_dir, calibration=settings, images=calibration, **kwargs)
