"""The student's starting weights: the pruned teacher, or a given safetensors file (prune.student_init)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trainer.cli import load_config
from trainer.models.registry import get_adapter
from trainer.student import build_models

pytestmark = pytest.mark.unit


def build(yaml_path, *overrides):
    cfg = load_config(yaml_path, list(overrides))
    return build_models(cfg, get_adapter(cfg.model.family))


def test_student_init_replaces_the_pruned_weights(tiny_timm_yaml, tmp_path) -> None:
    _, student, _ = build(tiny_timm_yaml)
    state = {k: v + 1.0 for k, v in student.state_dict().items()}
    path = tmp_path / "compensated.safetensors"
    save_file(state, path)
    _, loaded, _ = build(tiny_timm_yaml, f"prune.student_init={path}")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_student_init_errors_name_the_key(tiny_timm_yaml, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="prune.student_init"):
        build(tiny_timm_yaml, f"prune.student_init={tmp_path / 'missing.safetensors'}")
    _, teacher_sized, _ = build(tiny_timm_yaml, "prune.ratio=4")  # MLPs not pruned: other shapes
    path = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in teacher_sized.state_dict().items()}, path)
    with pytest.raises(ValueError, match="prune.student_init.*does not fit"):
        build(tiny_timm_yaml, f"prune.student_init={path}")
    with pytest.raises(ValueError, match="prune.student_init"):
        load_config(tiny_timm_yaml, ["prune.student_init=weights.pt"])
