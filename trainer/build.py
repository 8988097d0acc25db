"""Construction of the models from the config: the teacher and its pruned copy, the student."""

from __future__ import annotations

import copy

import torch
from torch import nn

import pruning
from trainer.config import TrainConfig
from trainer.models.base import ModelAdapter


def build_models(cfg: TrainConfig, adapter: ModelAdapter) -> tuple[nn.Module, nn.Module, pruning.PruneReport]:
    """(teacher, student, prune report): identical on every rank for a given run.seed."""
    torch.manual_seed(cfg.run.seed)
    teacher = adapter.build(cfg.model)
    student = copy.deepcopy(teacher)
    try:
        report = pruning.prune_model(student, ratio=cfg.prune.ratio, method=cfg.prune.method,
                                     generator=torch.Generator().manual_seed(cfg.run.seed))
    except ValueError as err:
        raise ValueError(f"prune.ratio / prune.method: {err}") from None
    return teacher, student, report

