"""DistillTask on the single engine: frozen teacher, exact loss terms, keep-all prune gives zero loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.cli import load_config
from trainer.config import EngineConfig, OptimConfig
from trainer.dist import DistEnv, read_env
from trainer.engines.base import Models, build_engine
from trainer.losses import hidden_term
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
                       teacher_layout=teacher_layout, loss=cfg.loss, student_blocks=adapter.blocks(student),
                       teacher_blocks=adapter.blocks(teacher))
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


def _timm_block_outputs(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output, by running the timm ViT's stem and blocks by hand (no hooks)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    outputs = []
    for block in model.blocks:
        x = block(x)
        outputs.append(x)
    return outputs


def test_hidden_state_term_matches_the_chosen_blocks(tiny_timm_yaml) -> None:
    task, engine, student, teacher = make_task(tiny_timm_yaml, ["loss.block_weight=0.5", "loss.blocks=[0]"])
    images = torch.randn(3, 3, 32, 32)
    out = task(images)
    with torch.no_grad():
        s, t = _timm_block_outputs(student, images), _timm_block_outputs(teacher, images)
    expected = float((s[0] - t[0]).square().mean() / t[0].square().mean())
    assert out["loss_blocks"].item() == pytest.approx(expected, rel=1e-5) and expected > 0
    assert out["loss"].item() == pytest.approx(out["loss_cls"].item() + out["loss_patch"].item() + 0.5 * expected,
                                               rel=1e-6)
    # Block 0's term reaches block 0 only: with the other terms off, the last block gets no gradient.
    task.cfg = type(task.cfg)(cls_weight=0.0, patch_weight=1e-30, block_weight=1.0, blocks=(0,))
    student.zero_grad()
    engine.backward(task(images)["loss"], last_micro_batch=True)
    assert student.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert student.blocks[-1].mlp.fc1.weight.grad.abs().max() < 1e-20
    # Validation forwards leave nothing behind in the taps.
    task.evaluate(images)
    assert task.taps is not None and task.taps[0].outputs == {} and task.taps[1].outputs == {}


def test_hidden_state_term_of_an_unchanged_student_is_zero(tiny_open_clip_yaml) -> None:
    task, _, _, _ = make_task(tiny_open_clip_yaml, ["prune.enabled=false", "loss.block_weight=1",
                                                    "loss.blocks=[0, -1]"])
    assert task(torch.randn(2, 3, 32, 32))["loss_blocks"].item() < 1e-12  # kernels with and without grad differ in ulps


def test_hidden_term_is_relative_and_block_indices_are_checked(tiny_timm_yaml) -> None:
    t = torch.randn(2, 5, 8)
    assert hidden_term(t, t).item() == 0.0 and hidden_term(2 * t, t).item() == pytest.approx(1.0)
    assert hidden_term(1e3 * 2 * t, 1e3 * t).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="loss.blocks: index 5 is outside the model's 2 blocks"):
        make_task(tiny_timm_yaml, ["loss.block_weight=1", "loss.blocks=[5]"])
    with pytest.raises(ValueError, match="loss.blocks: the hidden-state term needs both"):
        load_config(tiny_timm_yaml, ["loss.block_weight=1"])
