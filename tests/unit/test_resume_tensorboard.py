"""A resumed run's TensorBoard curves: one point per step, the resumed run's values past the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.checkpoint import checkpoint_name
from trainer.cli import load_config
from trainer.loop import train

pytestmark = pytest.mark.unit

TINY_TIMM = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "tiny_timm.yaml"


def run(run_dir: Path, *overrides: str) -> dict[int, float]:
    cfg = load_config(TINY_TIMM, [
        "engine.name=single", f"run.dir={run_dir}", "run.steps=6", "run.log_every_steps=1",
        "optim.base_lr=0.05", "checkpoint.every_steps=2", "checkpoint.keep_last=5", *overrides,
    ])
    return train(cfg).losses


def scalar_points(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_resume_purges_the_points_logged_after_the_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run(run_dir)  # logs steps 1..6; as if it had died after step 6, its last checkpoint at 4 chosen
    resumed = run(run_dir, f"checkpoint.resume={run_dir / 'checkpoints' / checkpoint_name(4)}")
    assert sorted(resumed) == [4, 5]
    points = scalar_points(run_dir, "loss/total")
    assert [step for step, _ in points] == [1, 2, 3, 4, 5, 6]  # no step twice
    # steps 1-4 from the first run, 5-6 from the resumed one (its float32 event values)
    expected = [first[s] for s in range(4)] + [resumed[4], resumed[5]]
    assert [value for _, value in points] == pytest.approx(expected, rel=1e-6)
