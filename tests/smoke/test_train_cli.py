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


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def test_cli_trains_and_writes_the_run_directory(tmp_path: Path, tiny_open_clip_yaml: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli(str(tiny_open_clip_yaml), "engine.name=single", f"run.dir={run_dir}", "run.steps=4",
                   "run.log_every_steps=2", "optim.grad_accum_steps=2", "engine.precision=bf16",
                   "engine.activation_checkpointing=true")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "step 4/4" in done.stderr and "eta" in done.stderr
    assert "No pretrained weights loaded" not in done.stderr  # open_clip's warning: the config asks for random init
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["steps"] == 4 and saved["engine"]["precision"] == "bf16"
    assert (run_dir / "prune_report.json").is_file()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [2, 4]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_cli_rejects_unknown_key_before_training(tmp_path: Path, tiny_timm_yaml: Path) -> None:
    done = run_cli(str(tiny_timm_yaml), f"run.dir={tmp_path / 'never'}", "optim.lr=1")
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown config key(s): optim.lr (known in optim.: ")
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "never").exists()


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


def test_bad_files_fail_before_any_model_is_built(tmp_path: Path, tiny_timm_yaml: Path,
                                                 tiny_open_clip_yaml: Path) -> None:
    run_dir = f"run.dir={tmp_path / 'never'}"
    missing = tmp_path / "teacher.safetensors"
    line = one_line_error(run_cli(str(tiny_open_clip_yaml), run_dir, "engine.name=single", f"model.pretrained={missing}"))
    assert line == f"error: model.pretrained: no such file {missing}"
    missing.write_bytes((16).to_bytes(8, "little") + b'{"w": {"dtype"')  # a header cut short
    line = one_line_error(run_cli(str(tiny_timm_yaml), run_dir, f"model.pretrained={missing}"))
    assert line.startswith(f"error: model.pretrained: {missing}")

    # The data layout of 2 ranks, checked by each rank before the process group or any model exists.
    (tmp_path / "00000.tar").write_bytes(b"")
    data = ["data.kind=webdataset", f"data.shards={tmp_path / '00000.tar'}", "data.num_workers=1"]
    ranks = [run_cli(str(tiny_timm_yaml), run_dir, *data, env={"RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)]
    assert one_line_error(ranks[0]) == (f"error: data.shards {tmp_path / '00000.tar'}: 1 shard(s) for world_size 2: "
                                        "rank 1 gets no shard; use more shards, fewer ranks, or data.resampled: true")
    assert (ranks[1].returncode, ranks[1].stderr) == (2, "")  # rank 0 speaks for all
    assert not (tmp_path / "never").exists()


def test_debug_shows_the_traceback(tmp_path: Path, tiny_timm_yaml: Path) -> None:
    bad = [str(tiny_timm_yaml), f"model.pretrained={tmp_path / 'none.pt'}"]
    for done in (run_cli(*bad, "--debug"), run_cli(*bad, env={"TRAINER_DEBUG": "1"})):
        assert done.returncode == 1 and "Traceback" in done.stderr
        assert f"FileNotFoundError: model.pretrained: no such file {tmp_path / 'none.pt'}" in done.stderr


def test_subcommands_share_the_error_style(tmp_path: Path) -> None:
    line = one_line_error(run_cli("export", str(tmp_path / "nope"), "--out", str(tmp_path / "out")))
    assert str(tmp_path / "nope") in line
    line = one_line_error(run_cli("plan", str(tmp_path / "missing.yaml")))
    assert str(tmp_path / "missing.yaml") in line
