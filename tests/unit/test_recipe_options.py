"""Trainer-level recipe knobs on real tiny runs: the compensated start's warm-up, the training image size, the
hidden-state term."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.cli import load_config
from trainer.loop import train
from trainer.models.registry import get_adapter
from trainer.schedule import lr_at, peak_lr
from trainer.student import build_models

pytestmark = pytest.mark.unit

STEPS = 10


def lr_trace(tiny_timm_yaml: Path, run_dir: Path, *overrides: str) -> list[float]:
    """opt/lr of every step of a real single-process run, as TensorBoard holds it."""
    cfg = load_config(tiny_timm_yaml, ["engine.name=single", f"run.dir={run_dir}", f"run.steps={STEPS}",
                                       "run.log_every_steps=1", "optim.base_lr=0.05", *overrides])
    train(cfg)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return [e.value for e in events.Scalars("opt/lr")]


def test_student_init_run_warms_up_over_a_fifth(tiny_timm_yaml: Path, tmp_path: Path) -> None:
    cfg = load_config(tiny_timm_yaml)
    _, student, _ = build_models(cfg, get_adapter(cfg.model.family))
    init = tmp_path / "compensated.safetensors"
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, init)
    peak = peak_lr(0.05, cfg.optim.batch_size_per_rank)
    expected = [lr_at(s, peak=peak, warmup_steps=2, total_steps=STEPS) for s in range(STEPS)]
    assert lr_trace(tiny_timm_yaml, tmp_path / "init", f"prune.student_init={init}") == pytest.approx(expected)
    assert expected[0] == pytest.approx(peak / 2)
    # A plain pruned start keeps base.yaml's schedule: the peak from the first step.
    plain = lr_trace(tiny_timm_yaml, tmp_path / "plain")
    assert plain[0] == pytest.approx(peak)


def test_training_at_a_smaller_image_size_with_dynamic_position_embeddings(tiny_timm_yaml: Path,
                                                                             tmp_path: Path) -> None:
    cfg = load_config(tiny_timm_yaml, ["engine.name=single", f"run.dir={tmp_path / 'run'}", "run.steps=2",
                                       "run.log_every_steps=1", "data.image_size=16",
                                       "model.kwargs.dynamic_img_size=true"])
    losses = train(cfg).losses
    assert sorted(losses) == [0, 1] and all(v == v and v > 0 for v in losses.values())
    # The same run at the model's fixed size refuses 16 px inputs: the option is what makes it work.
    fixed = load_config(tiny_timm_yaml, ["engine.name=single", f"run.dir={tmp_path / 'fixed'}", "run.steps=1",
                                         "data.image_size=16"])
    with pytest.raises(AssertionError, match="Input height"):
        train(fixed)


def test_a_run_with_the_hidden_state_term_logs_it(tiny_timm_yaml: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = load_config(tiny_timm_yaml, ["engine.name=single", f"run.dir={run_dir}", "run.steps=2",
                                       "run.log_every_steps=1", "loss.block_weight=1", "loss.blocks=[0, 1]"])
    train(cfg)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    blocks = [e.value for e in events.Scalars("loss/blocks")]
    assert len(blocks) == 2 and all(v > 0 for v in blocks)
    assert "data/samples_skipped" in events.Tags()["scalars"]
