"""``python -m trainer export`` of a single-engine open_clip checkpoint, loaded back with stock open_clip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from pruning.export import OPEN_CLIP_VISUAL_WEIGHTS, PRUNING_KEY, read_pruning_record
from trainer.checkpoint import checkpoint_name
from trainer.cli import load_config, run_subcommand
from trainer.export import build_student, restore_head
from trainer.loop import train

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_open_clip_export_is_stock_loadable_and_matches_the_student(tmp_path: Path, tiny_open_clip_yaml: Path) -> None:
    cfg = load_config(tiny_open_clip_yaml, ["engine.name=single", f"run.dir={tmp_path / 'run'}", "run.steps=2",
                                            "prune.ratio=0.5", "optim.base_lr=0.05"])
    result = train(cfg)
    trained = result.engine.gather_student_state()
    checkpoint = tmp_path / "run" / "checkpoints" / checkpoint_name(2)
    out = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "trainer", "export", str(checkpoint), "--out", str(out)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    record = read_pruning_record(out)[1][PRUNING_KEY]
    assert record["stock_loadable"] and record["trainer_step"] == 2
    assert f"exported step 2 ({checkpoint.resolve()}) -> {out}" in done.stdout and "warning" not in done.stderr

    clip = open_clip.create_model(f"local-dir:{out}", load_weights=False)
    clip.visual.load_state_dict(load_file(out / OPEN_CLIP_VISUAL_WEIGHTS), strict=True)
    student, layout = build_student(cfg)
    student.load_state_dict(trained, strict=True)
    restore_head(student, layout)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(clip.eval().encode_image(images), student.eval()(images), rtol=0, atol=0)
    assert {m.c_fc.out_features for m in (b.mlp for b in clip.visual.transformer.resblocks)} == {32}


def test_export_refuses_an_incomplete_checkpoint_and_an_existing_output(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_subcommand(["export", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "output directory exists" in capsys.readouterr().err
    assert run_subcommand(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert f"{tmp_path}: not a complete checkpoint" in capsys.readouterr().err
