"""The real ``python -m trainer`` end to end on a tiny model, and its refusal of a bad config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.smoke

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)


def test_cli_trains_and_writes_the_run_directory(tmp_path: Path, tiny_open_clip_yaml: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli(str(tiny_open_clip_yaml), "engine.name=single", f"run.dir={run_dir}", "run.steps=4",
                   "run.log_every_steps=2", "optim.grad_accum_steps=2", "engine.precision=bf16",
                   "engine.activation_checkpointing=true")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "step 4/4" in done.stderr and "eta" in done.stderr
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["steps"] == 4 and saved["engine"]["precision"] == "bf16"
    assert (run_dir / "prune_report.json").is_file()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [2, 4]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_cli_rejects_unknown_key_before_training(tmp_path: Path, tiny_timm_yaml: Path) -> None:
    done = run_cli(str(tiny_timm_yaml), f"run.dir={tmp_path / 'never'}", "optim.lr=1")
    assert done.returncode != 0
    assert "optim.lr" in done.stderr
    assert not (tmp_path / "never").exists()
