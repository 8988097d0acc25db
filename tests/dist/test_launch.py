"""``python -m trainer`` under both launchers and both scripts in launchers/ (one node), 2 CPU ranks: it trains,
and only rank 0 speaks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.checkpoint import checkpoint_name, validate

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def launch(launcher: list[str], yaml_path: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [*launcher, str(yaml_path), f"run.dir={run_dir}", "run.steps=4", "run.log_every_steps=2", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_rank0_only(done: subprocess.CompletedProcess, run_dir: Path) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    output = done.stdout + done.stderr
    progress = [line for line in output.splitlines() if " step " in f" {line}" and "eta" in line]
    assert len(progress) == 2, progress  # steps 2 and 4, from one rank
    assert output.count('"final_loss"') == 1
    assert (run_dir / "config.yaml").is_file()
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 1


def test_torchrun_fsdp_open_clip(tmp_path: Path, tiny_open_clip_yaml: Path) -> None:
    run_dir = tmp_path / "run"
    done = launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "trainer"],
                  tiny_open_clip_yaml, run_dir, "engine.name=fsdp")
    assert_rank0_only(done, run_dir)


def test_deepspeed_launcher_zero3(tmp_path: Path, tiny_timm_yaml: Path) -> None:
    run_dir = tmp_path / "run"
    port = 29500 + os.getpid() % 1000
    done = launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", "trainer"],
                  tiny_timm_yaml, run_dir, "engine.name=deepspeed", "engine.zero_stage=3")
    assert_rank0_only(done, run_dir)


def single_node(script: str, yaml_path: Path, run_dir: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    """``launchers/<script>`` in its one-node mode: NPROC_PER_NODE=2 and no hostfile or rendezvous settings."""
    clean = {k: v for k, v in os.environ.items() if k not in ("HOSTFILE", "NNODES", "RDZV_ENDPOINT", "MASTER_ADDR")}
    command = [str(REPO / "launchers" / script), str(yaml_path), f"run.dir={run_dir}", "run.steps=2",
               "run.log_every_steps=1", *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**clean, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1", **env})


def test_deepspeed_sh_single_node(tmp_path: Path, tiny_timm_yaml: Path) -> None:
    run_dir = tmp_path / "run"
    done = single_node("deepspeed.sh", tiny_timm_yaml, run_dir, "engine.name=deepspeed", DEEPSPEED=str(BIN / "deepspeed"),
                       MASTER_PORT=str(29500 + os.getpid() % 1000))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    output = done.stdout + done.stderr
    launched = done.stderr.splitlines()[0]  # the script echoes its command first
    assert launched.startswith("+ ") and "--hostfile" not in launched and "--num_gpus 2" in launched
    assert "ssh" not in output.lower()
    assert [line.split()[1] for line in output.splitlines() if line.startswith("step ")] == ["1/2", "2/2"]
    assert validate(run_dir / "checkpoints" / checkpoint_name(2)).world_size == 2


def test_torchrun_sh_single_node(tmp_path: Path, tiny_open_clip_yaml: Path) -> None:
    run_dir = tmp_path / "run"
    done = single_node("torchrun.sh", tiny_open_clip_yaml, run_dir, TORCHRUN=str(BIN / "torchrun"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    output = done.stdout + done.stderr
    launched = done.stderr.splitlines()[0]
    assert launched.startswith("+ ") and "--standalone --nproc-per-node 2" in launched
    assert [line.split()[1] for line in output.splitlines() if line.startswith("step ")] == ["1/2", "2/2"]
    assert validate(run_dir / "checkpoints" / checkpoint_name(2)).world_size == 2
