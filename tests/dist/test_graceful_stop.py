"""SIGINT / SIGTERM mid-run on 2 CPU ranks of the real ``python -m trainer``, fsdp and deepspeed.

Each rank is started as its launcher would start it (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment), reading real webdataset shards through a DataLoader worker. Two ways a stop arrives:
- fsdp: Ctrl-C in a terminal, i.e. SIGINT to the whole process group (both ranks and their data
  workers), with wall-time checkpoints every 0.6 s on top of the step-count ones;
- deepspeed: SIGTERM to rank 1 alone (a scheduler or ``kill`` reaching one process): rank 0 never
  sees a signal and must stop at the same step.
Both must exit 130 after saving a complete checkpoint of the stopped step, rank 0 printing one line,
without tracebacks; the same commands run again must resume from that checkpoint and finish.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.checkpoint import LATEST, checkpoint_name, complete_checkpoints, validate
from trainer.data.make_shards import write_shards
from trainer.dist import STOP_EXIT_CODE

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
TINY_TIMM = REPO / "configs" / "experiments" / "tiny_timm.yaml"
STEPS = 400  # never reached by the first launch: the signal comes at step 3
SIGNAL_AT_STEP = 3
STOPPED = re.compile(r"^stopped at step (\d+); resume with the same command \(checkpoint (\S+)\)$", re.M)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 small PNGs in 8 shards: 4 per rank, enough for one DataLoader worker each."""
    root = tmp_path_factory.mktemp("stop_data")
    gen = np.random.default_rng(0)
    for i in range(64):
        folder = root / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gen.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    write_shards(root / "images", root / "shards", shard_size=8)
    return root / "shards" / "shards.txt"


def command(engine: str, run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer", str(TINY_TIMM), f"run.dir={run_dir}", f"engine.name={engine}",
            f"run.steps={STEPS}", "run.log_every_steps=1", "data.kind=webdataset", f"data.shards={shards}",
            "data.num_workers=1", "data.shuffle_buffer=8", *extra]


def start_ranks(cmd: list[str], logs: Path, port: int) -> list[subprocess.Popen]:
    """Both ranks in one new process group (as a terminal's foreground job); logs/rank<r>.err."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        group = procs[0].pid if procs else 0  # rank 0 leads a new process group, rank 1 joins it
        with open(logs / f"rank{rank}.out", "w") as out, open(logs / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, process_group=group))
    return procs


def wait_for(pattern: str, log: Path, procs: list[subprocess.Popen], limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while not re.search(pattern, log.read_text(), re.M):
        assert all(p.poll() is None for p in procs), f"a rank ended before {pattern!r}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"{pattern!r} never appeared in {log}"
        time.sleep(0.05)


def finish(procs: list[subprocess.Popen], logs: Path, limit_s: float = 240) -> tuple[list[int], list[str]]:
    """Exit statuses and stderr of both ranks (a rank still running after ``limit_s`` is killed, and fails)."""
    try:
        codes = [p.wait(timeout=limit_s) for p in procs]
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        pytest.fail("ranks still running:\n" + (logs / "rank0.err").read_text()[-4000:])
    return codes, [(logs / f"rank{r}.err").read_text() for r in range(2)]


def stop_and_resume(engine: str, tmp_path: Path, shards: Path, port: int, send: callable,
                    *extra: str) -> tuple[int, list[int]]:
    """Launch, ``send`` the stop once step SIGNAL_AT_STEP is logged, check the stop, rerun and check the resume.

    Returns the stopped step and the steps of the complete checkpoints present right after the stop.
    """
    run_dir = tmp_path / "run"
    cmd = command(engine, run_dir, shards, *extra)
    procs = start_ranks(cmd, tmp_path / "stop", port)
    wait_for(rf"^step {SIGNAL_AT_STEP}/{STEPS} ", tmp_path / "stop" / "rank0.err", procs)
    send(procs)
    codes, errs = finish(procs, tmp_path / "stop")
    assert codes == [STOP_EXIT_CODE, STOP_EXIT_CODE], errs[0][-3000:] + errs[1][-3000:]
    lines = STOPPED.findall(errs[0])
    assert len(lines) == 1, errs[0][-3000:]
    assert "stopped at" not in errs[1]  # only rank 0 speaks
    for err in errs:
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    step = int(lines[0][0])
    assert SIGNAL_AT_STEP <= step < STEPS
    checkpoint = run_dir / "checkpoints" / checkpoint_name(step)
    assert Path(lines[0][1]) == checkpoint
    manifest = validate(checkpoint)  # complete: every file the manifest lists, at its size
    assert (manifest.step, manifest.world_size) == (step, 2)
    assert {"rank-00000.pt", "rank-00001.pt"} <= set(manifest.files)
    assert (run_dir / "checkpoints" / LATEST).read_text().strip() == checkpoint_name(step)
    assert not list(run_dir.glob("checkpoints/.tmp-*"))
    after_stop = sorted(validate(p).step for p in complete_checkpoints(run_dir / "checkpoints"))

    procs = start_ranks(cmd, tmp_path / "resume", port + 1)  # the same command again
    codes, errs = finish(procs, tmp_path / "resume")
    assert codes == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert f"resumed from {checkpoint} at step {step}" in errs[0]
    assert re.search(rf"^step {step + 1}/{STEPS} ", errs[0], re.M)  # it goes on from the step after
    assert not re.search(rf"^step {step}/{STEPS} ", errs[0], re.M)
    assert f'"steps": {STEPS}' in (tmp_path / "resume" / "rank0.out").read_text()
    assert validate(run_dir / "checkpoints" / checkpoint_name(STEPS)).step == STEPS
    return step, after_stop


def test_ctrl_c_on_fsdp_saves_and_resumes(tmp_path: Path, shards: Path) -> None:
    port = 29600 + os.getpid() % 300

    def ctrl_c(procs: list[subprocess.Popen]) -> None:
        os.killpg(procs[0].pid, signal.SIGINT)  # ranks and their DataLoader workers, as a terminal does

    step, after_stop = stop_and_resume("fsdp", tmp_path, shards, port, ctrl_c, "checkpoint.every_minutes=0.0001")
    # Wall-time checkpoints (every 6 ms: after every step; every_steps is 1000) came before the stop, agreed by
    # the ranks; keep_last leaves at most two of them.
    assert after_stop[-1] == step and 1 <= len(after_stop[:-1]) <= 2 and after_stop[0] >= 1


def test_sigterm_to_one_deepspeed_rank_stops_both(tmp_path: Path, shards: Path) -> None:
    port = 29900 + os.getpid() % 300

    def term_rank_1(procs: list[subprocess.Popen]) -> None:
        procs[1].send_signal(signal.SIGTERM)

    stop_and_resume("deepspeed", tmp_path, shards, port, term_rank_1, "engine.zero_stage=2",
                    "checkpoint.every_minutes=0")
