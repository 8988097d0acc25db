"""Checkpoints across real processes: kill -9, kill mid-save, world-size change, export. gloo, CPU, fp32.

Every run trains the same 8 steps of the tiny timm ViT on the same global batches (8 images,
split over the ranks: ckpt_worker.GlobalBatchStream), a checkpoint every 2 steps. Launches, in
order, shared by all assertions (DeepSpeed's start-up is the slow part):

  L0  python, 1 rank     single: killed while its step-4 save waits inside (temporary directory present)
  L1  torchrun, 2 ranks  uninterrupted references: fsdp, deepspeed ZeRO-2 (ds), ZeRO-3 (ds3)
  L2  torchrun, 1 rank   single resumes L0 (auto); fsdp, ds and ds3 resume L1's step 4 (2 -> 1 ranks)
  L3  torchrun, 2 ranks  fsdp, rank 1 killed with SIGKILL after the step-4 checkpoint
  L4  torchrun, 2 ranks  fsdp resumes L3 (auto); fsdp, ds, ds3 resume L2's step 6 (1 -> 2 ranks);
                         ds3, rank 1 killed with SIGKILL after the step-4 checkpoint
  L5  torchrun, 2 ranks  ds3 resumes L4's killed run (auto)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from trainer.checkpoint import CONFIG, LATEST, TMP_PREFIX, checkpoint_name, validate
from trainer.cli import load_config
from trainer.export import build_student, restore_head

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("ckpt_worker.py")
STEPS = 8
WORLD_CHANGE_RTOL = 1e-5


ENGINES = {"fsdp": ("fsdp", 2), "ds": ("deepspeed", 2), "ds3": ("deepspeed", 3)}
"""Short name in the job names -> (engine.name, engine.zero_stage)."""


def job(name: str, engine: str, out: Path, **extra: object) -> str:
    engine_name, stage = ENGINES.get(engine, (engine, 2))
    return json.dumps({"name": name, "engine": engine_name, "zero_stage": stage, "run_dir": str(out / name),
                       "steps": STEPS, **extra})


def resume_from(out: Path, run: str, step: int) -> list[str]:
    return [f"checkpoint.resume={out / run / 'checkpoints' / checkpoint_name(step)}"]


class Launcher:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log: list[str] = []

    def command(self, ranks: int | None, jobs: list[str]) -> list[str]:
        if ranks is None:
            return [sys.executable, str(WORKER), str(self.out), *jobs]
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        return [torchrun, "--standalone", "--nproc_per_node", str(ranks), str(WORKER), str(self.out), *jobs]

    def run(self, ranks: int | None, jobs: list[str]) -> None:
        done = subprocess.run(self.command(ranks, jobs), env=self.env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    def run_and_kill(self, ranks: int | None, jobs: list[str], *, when: Path, rank: int) -> int:
        """Start the launch, SIGKILL ``rank`` as soon as ``when`` exists; returns the launcher's exit status."""
        for pid_file in self.out.glob("pid.rank*"):
            pid_file.unlink()
        proc = subprocess.Popen(self.command(ranks, jobs), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        pid_file = self.out / f"pid.rank{rank}"
        while not (when.exists() and pid_file.exists()):
            assert proc.poll() is None, f"launch ended before {when} appeared:\n{proc.stdout.read()[-6000:]}"
            assert time.monotonic() < deadline, f"{when} never appeared"
            time.sleep(0.01)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
        self.log.append(output)
        return proc.returncode


def losses(out: Path, name: str, rank: int = 0) -> dict[int, float]:
    return {int(k): v for k, v in json.loads((out / f"{name}.rank{rank}.json").read_text()).items()}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    launch = Launcher(out)
    # L0: the stream sleeps in state_dict(), which the trainer calls inside the save, after the engine's files
    single_kill = out / "single-kill" / "checkpoints"
    status = launch.run_and_kill(None, [job("single-kill", "single", out, state_sleep_s=3.0)],
                                 when=single_kill / (TMP_PREFIX + checkpoint_name(4)), rank=0)
    assert status == -signal.SIGKILL
    (out / "l0-leftover.json").write_text(json.dumps(sorted(p.name for p in single_kill.iterdir())))
    launch.run(2, [job(f"{e}-ref", e, out) for e in ENGINES])
    launch.run(1, [job("single-kill", "single", out),
                   *[job(f"{e}-2to1", e, out, overrides=resume_from(out, f"{e}-ref", 4)) for e in ENGINES]])
    status = launch.run_and_kill(2, [job("fsdp-kill", "fsdp", out, batch_sleep_s=0.3)],
                                 when=out / "fsdp-kill" / "checkpoints" / checkpoint_name(4), rank=1)
    assert status != 0 and not (out / "fsdp-kill.rank1.json").exists()
    status = launch.run_and_kill(2, [
        job("fsdp-kill", "fsdp", out),
        *[job(f"{e}-1to2", e, out, overrides=resume_from(out, f"{e}-2to1", 6)) for e in ENGINES],
        job("ds3-kill", "ds3", out, batch_sleep_s=0.3),
    ], when=out / "ds3-kill" / "checkpoints" / checkpoint_name(4), rank=1)
    assert status != 0 and not (out / "ds3-kill.rank1.json").exists()
    launch.run(2, [job("ds3-kill", "ds3", out)])
    return out


def test_kill_during_save_leaves_the_previous_checkpoint(out: Path) -> None:
    root = out / "single-kill" / "checkpoints"
    # what the kill left: step 2 complete and pointed to, step 4 only under its temporary name
    assert json.loads((out / "l0-leftover.json").read_text()) == [
        TMP_PREFIX + checkpoint_name(4), LATEST, checkpoint_name(2)]
    resumed = losses(out, "single-kill")
    assert sorted(resumed) == list(range(2, STEPS))  # resume=auto took step 2
    assert not list(root.glob(TMP_PREFIX + "*"))
    assert validate(root / checkpoint_name(STEPS)).step == STEPS


@pytest.mark.parametrize("engine", ["fsdp", "ds3"])
def test_kill_9_then_auto_resume_is_exact(out: Path, engine: str) -> None:
    reference, resumed = losses(out, f"{engine}-ref"), losses(out, f"{engine}-kill")
    start = min(resumed)
    assert start >= 4 and sorted(resumed) == list(range(start, STEPS))
    for rank in (0, 1):
        assert losses(out, f"{engine}-kill", rank) == {s: reference[s] for s in resumed}  # bit-identical


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("change, start", [("2to1", 4), ("1to2", 6)])
def test_resume_at_another_world_size(out: Path, engine: str, change: str, start: int) -> None:
    reference, resumed = losses(out, f"{engine}-ref"), losses(out, f"{engine}-{change}")
    assert sorted(resumed) == list(range(start, STEPS))
    worst = max(abs(resumed[s] - reference[s]) / reference[s] for s in resumed)
    print(f"{engine} {change}: max relative loss difference {worst:.2e}")
    assert worst <= WORLD_CHANGE_RTOL


@pytest.mark.parametrize("engine", list(ENGINES))
def test_export_loads_in_stock_timm_and_matches_the_student(out: Path, engine: str) -> None:
    export_dir = out / f"{engine}-export"
    checkpoint = out / f"{engine}-ref" / "checkpoints" / checkpoint_name(STEPS)
    done = subprocess.run([sys.executable, "-m", "trainer", "export", str(checkpoint), "--out", str(export_dir)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    stock = timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval()
    # the student as training left it (gathered from the engine), its head put back
    student, layout = build_student(load_config(checkpoint / CONFIG))
    student.load_state_dict(torch.load(out / f"{engine}-ref.student.pt"), strict=True)
    restore_head(student, layout)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(stock(images), student.eval()(images), rtol=0, atol=0)
