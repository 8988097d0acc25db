"""``python -m trainer.eval`` as a user runs it: tiny timm and open_clip students, exported, evaluated on local files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.checkpoint import checkpoint_name
from trainer.cli import load_config
from trainer.eval.cli import main
from trainer.export import export_checkpoint
from trainer.loop import train

pytestmark = pytest.mark.smoke

REPO = Path(__file__).resolve().parents[2]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _inputs(root: Path) -> tuple[Path, Path]:
    gen = np.random.default_rng(1)
    fm = root / "fashion"
    fm.mkdir()
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = gen.integers(0, 10, n)
        _write_idx(fm / f"{prefix}-images-idx3-ubyte", np.clip(gen.normal(20 * labels[:, None, None], 60, (n, 28, 28)), 0, 255))
        _write_idx(fm / f"{prefix}-labels-idx1-ubyte", labels)
    pictures = root / "pictures"
    pictures.mkdir()
    for i in range(4):
        Image.fromarray(gen.integers(0, 255, (36, 36 + i, 3), dtype=np.uint8)).save(pictures / f"{i}.png")
    return fm, pictures


def _export(root: Path, yaml_name: str) -> Path:
    cfg = load_config(REPO / "configs" / "experiments" / yaml_name,
                      ["engine.name=single", f"run.dir={root / 'run'}", "run.steps=1", "prune.ratio=0.5"])
    train(cfg)
    return export_checkpoint(root / "run" / "checkpoints" / checkpoint_name(1), root / "export")


def test_eval_cli_on_a_timm_export_prints_a_table_progress_and_json(tmp_path: Path) -> None:
    fm, pictures = _inputs(tmp_path)
    export = _export(tmp_path / "timm", "tiny_timm.yaml")
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [sys.executable, "-m", "trainer.eval", str(export), "--fashion-mnist", str(fm), "--heldout", str(pictures),
         "--knn-image-size", "48", "--train-images", "30", "--test-images", "12", "--k", "5", "--device", "cpu",
         "--json", str(out)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(out.read_text())
    # Nothing chosen and --heldout given: kNN, linear probe and fidelity (teacher: the run's config).
    assert {"knn_top1", "linear_top1", "cls_cosine", "patch_cosine"} <= set(got)
    assert got["fashion_mnist"] == {"root": str(fm), "train_images": 30, "test_images": 12, "image_size": 48,
                                    "seed": 0}
    assert got["image_size"] == 32 and got["teacher"].startswith("timm:vit_tiny_patch16_224")
    assert f"| kNN top-1 (%) | {100 * got['knn_top1']:.2f} |" in done.stdout
    assert f"| CLS cosine | {got['cls_cosine']:.4f} |" in done.stdout
    assert "features" in done.stderr and "fidelity" in done.stderr  # the progress bars


def test_eval_cli_on_an_open_clip_export(tmp_path: Path) -> None:
    fm, pictures = _inputs(tmp_path)
    export = _export(tmp_path / "oc", "tiny_open_clip_fsdp.yaml")
    out = tmp_path / "eval.json"
    assert main([str(export), "--teacher", str(export), "--fashion-mnist", str(fm), "--heldout", str(pictures),
                 "--train-images", "0", "--test-images", "0", "--k", "5", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["kind"] == "export" and 0.0 <= got["knn_top1"] <= 1.0 and 0.0 <= got["linear_top1"] <= 1.0
    assert got["cls_cosine"] == pytest.approx(1.0, abs=1e-6) and got["patch_cosine"] == pytest.approx(1.0, abs=1e-6)
