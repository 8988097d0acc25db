"""DistillTask on the single engine: frozen teacher, exact loss terms, keep-all prune gives zero loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.cli import load_config
from trainer.config import EngineConfig, OptimConfig
from trainer.dist import DistEnv, read_env
from trainer.engines.base import Models, build_engine
from trainer.models.registry import get_adapter
from trainer.student import build_models
from trainer.task import DistillTask, freeze_teacher

pytestmark = pytest.mark.unit


def make_task(yaml_path, overrides=()):
    cfg = load_config(yaml_path, ["engine.name=single", *overrides])
    adapter = get_adapter(cfg.model.family)
    teacher, student, _ = build_models(cfg, adapter)
    freeze_teacher(teacher)
    student_layout, teacher_layout = adapter.strip_head(student), adapter.strip_head(teacher)
    engine = build_engine(cfg.engine, cfg.optim, read_env())
    engine.setup(Models(student, teacher, adapter.blocks, adapter.enable_activation_checkpointing))
    task = DistillTask(engine.student, engine.teacher, student_layout=student_layout,
                       teacher_layout=teacher_layout, loss=cfg.loss)
    return task, engine, student, teacher


@pytest.mark.parametrize("which", ["tiny_timm_yaml", "tiny_open_clip_yaml"])
def test_loss_terms_and_frozen_teacher(which: str, request: pytest.FixtureRequest) -> None:
    task, engine, student, teacher = make_task(request.getfixturevalue(which),
                                               ["loss.cls_weight=0.5", "loss.patch_weight=2.0"])
    images = torch.randn(4, 3, 32, 32)
    out = task(images)
    with torch.no_grad():
        s, t = student(images), teacher(images)
    assert out["loss_cls"] == pytest.approx(float(F.mse_loss(s[:, 0], t[:, 0])), rel=1e-6)
    assert out["loss_patch"] == pytest.approx(float(F.mse_loss(s[:, 1:], t[:, 1:])), rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * out["loss_cls"].item() + 2.0 * out["loss_patch"].item(), rel=1e-6)
    engine.backward(out["loss"], last_micro_batch=True)
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for g in engine.optimizer.param_groups for p in g["params"])
    # Matrices decay, 1-d parameters do not.
    decays = {id(p): g["decays"] for g in engine.optimizer.param_groups for p in g["params"]}
    assert all(decays[id(p)] == (p.ndim >= 2) for p in student.parameters())


def test_keep_all_prune_distills_to_zero_loss(tiny_timm_yaml) -> None:
    # mlp_ratio 4: ratio 4 keeps every hidden unit, only reordered, so the student equals the teacher.
    task, _, _, _ = make_task(tiny_timm_yaml, ["prune.ratio=4.0"])
    out = task(torch.randn(2, 3, 32, 32))
    assert out["loss"].item() < 1e-10


def test_set_hparams_reaches_the_optimizer(tiny_timm_yaml) -> None:
    _, engine, _, _ = make_task(tiny_timm_yaml)
    engine.set_hparams(lr=0.123, weight_decay=0.07)
    groups = engine.optimizer.param_groups
    assert all(g["lr"] == 0.123 for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.07, 0.0]
    assert engine.optimizer.defaults["betas"] == (0.9, 0.95)


def test_single_engine_refuses_a_multi_rank_launch() -> None:
    with pytest.raises(ValueError, match="engine.name"):
        build_engine(EngineConfig(name="single"), OptimConfig(), DistEnv(0, 0, 2, torch.device("cpu")))
