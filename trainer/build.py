"""Host-side construction (``prune.in_engine=false``): the full teacher and its pruned copy, the student, on every rank.

The sharded alternative, where no rank ever holds a full model, is trainer/sharded_prune.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import pruning
from trainer.config import TrainConfig
from trainer.models.base import ModelAdapter


def build_models(cfg: TrainConfig, adapter: ModelAdapter) -> tuple[nn.Module, nn.Module, pruning.PruneReport]:
    """(teacher, student, prune report): identical on every rank for a given run.seed."""
    torch.manual_seed(cfg.run.seed)
    teacher = adapter.build(cfg.model)
    student = copy.deepcopy(teacher)
    if not cfg.prune.enabled:
        count = sum(p.numel() for p in teacher.parameters())
        report = pruning.PruneReport("none", [], count, count)
    else:
        try:
            report = pruning.prune_model(student, ratio=cfg.prune.ratio, method=cfg.prune.method,
                                         generator=torch.Generator().manual_seed(cfg.run.seed))
        except ValueError as err:
            raise ValueError(f"prune.ratio / prune.method: {err}") from None
    if cfg.prune.student_init:
        load_student_init(student, Path(cfg.prune.student_init))
    return teacher, student, report


def load_student_init(student: nn.Module, path: Path) -> None:
    """Load the student's starting weights (strict): the file must match the pruned architecture."""
    if not path.is_file():
        raise FileNotFoundError(f"prune.student_init: no such file {path}")
    try:
        student.load_state_dict(load_file(path), strict=True)
    except (RuntimeError, OSError) as err:
        raise ValueError(f"prune.student_init: {path} does not fit the pruned student: {err}") from None

