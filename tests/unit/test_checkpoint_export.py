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

from pruning.export import OPEN_CLIP_VISUAL_WEIGHTS, OPEN_CLIP_WEIGHTS, PRUNING_KEY, read_pruning_record
from trainer.checkpoint import checkpoint_name
from trainer.cli import load_config, run_subcommand
from trainer.export import build_student, export_checkpoint, restore_head
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

    student, layout = build_student(cfg)
    student.load_state_dict(trained, strict=True)
    restore_head(student, layout)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.get_tokenizer(cfg.model.name)(["a photo of a cat", "a drawing of a dog", "shoes"])
    torch.manual_seed(cfg.run.seed)
    teacher = open_clip.create_model(cfg.model.name, pretrained=None).eval()  # the run's seeded teacher
    # A whole CLIP, loaded by stock open_clip in a fresh process: image features are the trained student's,
    # text features the teacher's, bit for bit.
    probe = ("import sys, torch, open_clip; torch.set_grad_enabled(False); "
             "m, _, _ = open_clip.create_model_and_transforms(sys.argv[1]); "
             "m.eval(); torch.save((m.encode_image(torch.load(sys.argv[2])).detach(), "
             "m.encode_text(torch.load(sys.argv[3])).detach(), m.logit_scale.detach()), sys.argv[4])")
    torch.save(images, tmp_path / "images.pt")
    torch.save(tokens, tmp_path / "tokens.pt")
    loaded = subprocess.run([sys.executable, "-c", probe, f"local-dir:{out}", str(tmp_path / "images.pt"),
                             str(tmp_path / "tokens.pt"), str(tmp_path / "features.pt")], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    image_features, text_features, logit_scale = torch.load(tmp_path / "features.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fresh process (OMP_NUM_THREADS=1): the same reduction order, exact equality
    with torch.no_grad():
        torch.testing.assert_close(image_features, student.eval()(images), rtol=0, atol=0)
        torch.testing.assert_close(text_features, teacher.encode_text(tokens), rtol=0, atol=0)
    torch.set_num_threads(threads)
    assert torch.equal(logit_scale, teacher.logit_scale.detach())
    assert record["text_tower"] == "the teacher's, unchanged"
    clip = open_clip.create_model(f"local-dir:{out}", load_weights=False)
    clip.load_state_dict(load_file(out / OPEN_CLIP_WEIGHTS), strict=True)
    assert {m.c_fc.out_features for m in (b.mlp for b in clip.visual.transformer.resblocks)} == {32}


def test_visual_only_export_holds_the_image_tower_alone(tmp_path: Path, tiny_open_clip_yaml: Path) -> None:
    cfg = load_config(tiny_open_clip_yaml, ["engine.name=single", f"run.dir={tmp_path / 'run'}", "run.steps=1"])
    trained = train(cfg).engine.gather_student_state()
    out = export_checkpoint(tmp_path / "run", tmp_path / "export", visual_only=True)
    assert not (out / OPEN_CLIP_WEIGHTS).exists()
    student, layout = build_student(cfg)
    student.load_state_dict(trained, strict=True)
    restore_head(student, layout)
    got = load_file(out / OPEN_CLIP_VISUAL_WEIGHTS)
    assert got.keys() == student.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in student.state_dict().items())
    assert read_pruning_record(out)[1][PRUNING_KEY]["text_tower"] is None


def test_export_refuses_an_incomplete_checkpoint_and_an_existing_output(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_subcommand(["export", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "output directory exists" in capsys.readouterr().err
    assert run_subcommand(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert f"{tmp_path}: not a complete checkpoint" in capsys.readouterr().err
