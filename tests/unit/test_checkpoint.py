"""Checkpoints on the single engine, in process: exact resume, layout, rotation, validation, fallback.

One uninterrupted 6-step run (a checkpoint every 2 steps) is shared by the tests; each test
copies the run directory it damages. The last test resumes a real webdataset stream mid-epoch.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset import TarWriter

from trainer.checkpoint import LATEST, MANIFEST, TMP_PREFIX, checkpoint_name, validate
from trainer.cli import load_config
from trainer.loop import train

pytestmark = pytest.mark.unit

STEPS = 6
TINY_TIMM = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "tiny_timm.yaml"


def run(yaml_path: Path, run_dir: Path, *overrides: str) -> dict[int, float]:
    cfg = load_config(yaml_path, [
        "engine.name=single", f"run.dir={run_dir}", f"run.steps={STEPS}", "run.log_every_steps=1",
        "optim.base_lr=0.05", "optim.warmup_steps=2", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
        *overrides,
    ])
    return train(cfg).losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, float]]:
    run_dir = tmp_path_factory.mktemp("ckpt") / "ref"
    return run_dir, run(TINY_TIMM, run_dir)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_layout_rotation_and_latest(reference: tuple[Path, dict]) -> None:
    run_dir, _ = reference
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, checkpoint_name(4), checkpoint_name(6)]
    assert (root / LATEST).read_text().strip() == checkpoint_name(6)
    manifest = validate(root / checkpoint_name(6))
    assert (manifest.step, manifest.samples_seen, manifest.world_size, manifest.engine_format) == (6, 24, 1, "dcp")
    assert {"config.yaml", "rank-00000.pt", "engine/.metadata"} <= set(manifest.files)


def test_resume_from_a_path_is_exact(reference: tuple[Path, dict], tmp_path: Path, tiny_timm_yaml: Path) -> None:
    run_dir, losses = reference
    resumed = run(tiny_timm_yaml, tmp_path / "b", f"checkpoint.resume={run_dir / 'checkpoints' / checkpoint_name(4)}")
    assert sorted(resumed) == [4, 5]
    assert all(resumed[s] == losses[s] for s in resumed)  # bit-identical in fp32


def test_auto_resume_of_a_finished_run_does_nothing(reference: tuple[Path, dict], tmp_path: Path,
                                                    tiny_timm_yaml: Path) -> None:
    run_dir = copy_run(reference[0], tmp_path / "run")
    assert run(tiny_timm_yaml, run_dir) == {}


def test_truncated_file_is_named_and_auto_falls_back(reference: tuple[Path, dict], tmp_path: Path,
                                                     tiny_timm_yaml: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir, losses = reference
    run_dir = copy_run(run_dir, tmp_path / "run")
    newest = run_dir / "checkpoints" / checkpoint_name(6)
    shard = newest / "engine" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"__0_0\.distcp: truncated"):
        run(tiny_timm_yaml, run_dir, f"checkpoint.resume={newest}")
    # auto: warns, takes step 4, redoes steps 4 and 5 exactly (and overwrites the broken step 6)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        resumed = run(tiny_timm_yaml, run_dir)
    assert any(str(shard) in r.getMessage() for r in caplog.records)
    assert sorted(resumed) == [4, 5] and all(resumed[s] == losses[s] for s in resumed)
    assert validate(newest).step == 6


def test_foreign_and_missing_checkpoints_are_clear_errors(reference: tuple[Path, dict], tmp_path: Path,
                                                          tiny_timm_yaml: Path) -> None:
    foreign = copy_run(reference[0] / "checkpoints" / checkpoint_name(6), tmp_path / "foreign")
    data = json.loads((foreign / MANIFEST).read_text())
    (foreign / MANIFEST).write_text(json.dumps({**data, "format": "someone-else/3"}))
    with pytest.raises(ValueError, match="foreign checkpoint format"):
        run(tiny_timm_yaml, tmp_path / "b", f"checkpoint.resume={foreign}")
    (foreign / MANIFEST).unlink()
    with pytest.raises(ValueError, match="manifest.json is missing"):
        run(tiny_timm_yaml, tmp_path / "b", f"checkpoint.resume={foreign}")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(tiny_timm_yaml, tmp_path / "b", f"checkpoint.resume={tmp_path / 'nowhere'}")


def test_other_student_is_refused(reference: tuple[Path, dict], tmp_path: Path, tiny_timm_yaml: Path) -> None:
    path = reference[0] / "checkpoints" / checkpoint_name(6)
    with pytest.raises(ValueError, match="prune"):
        run(tiny_timm_yaml, tmp_path / "b", f"checkpoint.resume={path}", "prune.ratio=0.5")


def test_leftover_temporary_directory_is_ignored_then_removed(reference: tuple[Path, dict], tmp_path: Path,
                                                              tiny_timm_yaml: Path) -> None:
    run_dir = copy_run(reference[0], tmp_path / "run")
    root = run_dir / "checkpoints"
    # what a kill mid-save leaves: a half-written checkpoint under the temporary name
    shutil.copytree(root / checkpoint_name(6), root / (TMP_PREFIX + checkpoint_name(8)))
    (root / (TMP_PREFIX + checkpoint_name(8)) / MANIFEST).unlink()
    resumed = run(tiny_timm_yaml, run_dir, "run.steps=8")
    assert sorted(resumed) == [6, 7]
    assert not list(root.glob(TMP_PREFIX + "*"))
    assert validate(root / checkpoint_name(8)).step == 8


def test_webdataset_stream_resumes_exactly(tmp_path: Path, tiny_timm_yaml: Path) -> None:
    rng = np.random.default_rng(0)
    for s in range(4):
        with TarWriter(str(tmp_path / f"{s}.tar"), encoder=False) as writer:
            for i in range(7):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(buf, "JPEG")
                writer.write({"__key__": f"s{s}k{i}", "jpg": buf.getvalue(), "txt": b"x"})
    data = ["data.kind=webdataset", f"data.shards={tmp_path}/{{0..3}}.tar", "data.num_workers=1",
            "data.shuffle_buffer=5", "data.augment=light"]
    reference = run(tiny_timm_yaml, tmp_path / "a", *data)
    resumed = run(tiny_timm_yaml, tmp_path / "b", *data,
                  f"checkpoint.resume={tmp_path / 'a' / 'checkpoints' / checkpoint_name(4)}")
    assert sorted(resumed) == [4, 5] and all(resumed[s] == reference[s] for s in resumed)
