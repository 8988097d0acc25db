"""The launchers in ``launchers/`` across two real hosts: network namespaces joined by a veth pair.

Each host runs one rank; gloo and the rendezvous go over the veth link only (the namespaces have no
other route), so these are real multi-node runs on one machine. Needs root and ``ip netns``; skipped
otherwise, with the reason. A dead host and a silently dropped link must end the surviving rank
with a non-zero exit and an error naming the failure, within ``engine.dist_timeout_s`` plus a margin.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import netns  # tests/dist is on sys.path (rootdir-less test modules)
import pytest

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
TINY_TIMM = REPO / "configs" / "experiments" / "tiny_timm.yaml"
BIN = Path(sys.executable).parent
RDZV_PORT, MASTER_PORT = 29411, 29412  # inside fresh namespaces: nothing else can hold them
# Covers interpreter start, imports and model build (~10 s each on 2 shared cores), then the steps.
RUN_LIMIT_S = 150
# After a peer fails: the worker's exception, then torchrun noticing it (it polls every 0.1 s here).
EXIT_MARGIN_S = 20


@pytest.fixture
def hosts() -> Iterator[tuple[netns.Host, netns.Host]]:
    reason = netns.unavailable_reason()
    if reason is not None:
        print(f"skipping multi-node tests: {reason}")
        pytest.skip(reason)
    with netns.two_hosts() as pair:  # processes stopped and namespaces deleted even when a test fails
        yield pair


def host_env(host: netns.Host, **extra: str) -> dict[str, str]:
    # The launchers are named, PATH is left alone: the venv's ninja (1.13) and the system's (1.11) each
    # discard the other's build log, so a changed PATH would rebuild DeepSpeed's cached op (~2 min).
    return {**os.environ, "TORCHRUN": str(BIN / "torchrun"), "DEEPSPEED": str(BIN / "deepspeed"),
            "OMP_NUM_THREADS": "1", "NET_IF": host.ifname, **extra}


def torchrun(host: netns.Host, node_rank: int, master: netns.Host, log: Path, *args: str,
             slurm: bool = False) -> subprocess.Popen:
    # slurm=True: node rank and job id as srun sets them for launchers/slurm.sbatch, not NODE_RANK/RDZV_ID.
    rank_env = ({"SLURM_NODEID": str(node_rank), "SLURM_JOB_ID": "4242"} if slurm
                else {"NODE_RANK": str(node_rank), "RDZV_ID": "test"})
    env = host_env(host, NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"{master.addr}:{RDZV_PORT}",
                   LOCAL_ADDR=host.addr, **rank_env)
    return host.spawn([str(REPO / "launchers" / "torchrun.sh"), str(TINY_TIMM), *args], env=env, log=log, cwd=REPO)


def deepspeed(host: netns.Host, node_rank: int, master: netns.Host, hostfile: Path, log: Path,
              *args: str) -> subprocess.Popen:
    env = host_env(host, HOSTFILE=str(hostfile), NO_SSH="1", NODE_RANK=str(node_rank),
                   MASTER_ADDR=master.addr, MASTER_PORT=str(MASTER_PORT))
    return host.spawn([str(REPO / "launchers" / "deepspeed.sh"), str(TINY_TIMM), *args], env=env, log=log, cwd=REPO)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], limit_s: float) -> list[int]:
    deadline = time.monotonic() + limit_s
    codes = []
    for proc, log in zip(procs, logs, strict=True):
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{log.name} still running after {limit_s} s\n" + tails(logs))
    return codes


def wait_for_line(pattern: str, log: Path, procs: list[subprocess.Popen], limit_s: float) -> re.Match:
    """Poll ``log`` until a line matches; fail if the time runs out or a process exits first."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"), re.MULTILINE)
        if found:
            return found
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a process exited before /{pattern}/ appeared in {log.name}\n" + tails([log]))
        time.sleep(0.2)
    pytest.fail(f"/{pattern}/ not in {log.name} after {limit_s} s\n" + tails([log]))


def tails(logs: list[Path], chars: int = 3000) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}" for log in logs if log.exists())


def assert_trained(run_dir: Path, logs: list[Path], codes: list[int], steps: int) -> None:
    assert codes == [0, 0], tails(logs)
    text = [log.read_text(errors="replace") for log in logs]
    assert text[0].count(f'"steps": {steps}') == 1 and '"final_loss"' not in text[1], tails(logs)  # rank 0 speaks
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


def test_torchrun_two_hosts_fsdp(hosts: tuple[netns.Host, netns.Host], tmp_path: Path) -> None:
    a, b = hosts
    run_dir, logs = tmp_path / "run", [tmp_path / "a.log", tmp_path / "b.log"]
    args = (f"run.dir={run_dir}", "run.steps=4", "run.log_every_steps=2", "engine.name=fsdp", "engine.dist_timeout_s=30")
    procs = [torchrun(a, 0, a, logs[0], *args, slurm=True), torchrun(b, 1, a, logs[1], *args, slurm=True)]
    assert_trained(run_dir, logs, wait_all(procs, logs, RUN_LIMIT_S), steps=4)
    # The launcher printed what it ran; node 0 (SLURM_NODEID) hosts the store.
    assert "--rdzv-id 4242 --max-restarts 0 --shutdown-timeout 300 --rdzv-conf is_host=1" in logs[0].read_text()
    assert "--rdzv-conf is_host=0" in logs[1].read_text()


def test_deepspeed_no_ssh_two_hosts_zero2(hosts: tuple[netns.Host, netns.Host], tmp_path: Path) -> None:
    a, b = hosts
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host-a slots=1\nhost-b slots=1\n")  # names are not contacted under --no_ssh
    run_dir, logs = tmp_path / "run", [tmp_path / "a.log", tmp_path / "b.log"]
    args = (f"run.dir={run_dir}", "run.steps=4", "run.log_every_steps=2", "engine.name=deepspeed",
            "engine.zero_stage=2")
    procs = [deepspeed(a, 0, a, hostfile, logs[0], *args), deepspeed(b, 1, a, hostfile, logs[1], *args)]
    assert_trained(run_dir, logs, wait_all(procs, logs, RUN_LIMIT_S), steps=4)
    assert "dist_world_size=2" in logs[0].read_text()


def test_host_killed_then_resume(hosts: tuple[netns.Host, netns.Host], tmp_path: Path) -> None:
    """kill -9 every process of host B mid-run: A fails fast and names it; both hosts then resume."""
    a, b = hosts
    timeout_s, steps = 60, 120
    run_dir = tmp_path / "run"
    args = (f"run.dir={run_dir}", f"run.steps={steps}", "run.log_every_steps=10", "engine.name=fsdp",
            f"engine.dist_timeout_s={timeout_s}", "checkpoint.every_steps=10")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [torchrun(a, 0, a, logs[0], *args), torchrun(b, 1, a, logs[1], *args)]
    wait_for_line(r"^step 20/", logs[0], procs, RUN_LIMIT_S)
    b.kill_all()
    killed = time.monotonic()
    code = wait_all(procs[:1], logs[:1], timeout_s + EXIT_MARGIN_S)[0]
    elapsed = time.monotonic() - killed
    out = logs[0].read_text(errors="replace")
    print(f"host A exited {code} {elapsed:.1f} s after host B was killed")
    assert code != 0, tails(logs)
    # gloo sees the peer's sockets closed by its kernel: no need to wait for the timeout.
    assert elapsed < timeout_s, f"{elapsed:.1f} s\n" + tails(logs)
    # gloo's error names the failure and the peer: "Read error [B]:port: Connection reset by peer",
    # "Connection closed by peer [B]:port" or "... Broken pipe".
    error = re.search(r"^.*(Connection (closed|reset) by peer|Broken pipe).*$", out, re.MULTILINE)
    assert error and f"[{b.addr}]" in error.group(0), tails(logs)
    saved = checkpoint_steps(run_dir)
    assert saved and saved[-1] >= 20, saved

    # Relaunch the same command on both hosts: checkpoint.resume=auto picks the newest checkpoint.
    logs = [tmp_path / "a2.log", tmp_path / "b2.log"]
    procs = [torchrun(a, 0, a, logs[0], *args), torchrun(b, 1, a, logs[1], *args)]
    assert_trained(run_dir, logs, wait_all(procs, logs, RUN_LIMIT_S), steps=steps)
    resumed = re.search(r"resumed from \S+ at step (\d+)", logs[0].read_text())
    # The newest complete one: B may have died inside the last save, which resume=auto then skips.
    assert resumed and int(resumed.group(1)) in saved and int(resumed.group(1)) >= 20, tails(logs)


def test_link_down_times_out(hosts: tuple[netns.Host, netns.Host], tmp_path: Path) -> None:
    """Host B's link goes down silently (no FIN/RST): A gives up after engine.dist_timeout_s."""
    a, b = hosts
    timeout_s = 10
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host-a slots=1\nhost-b slots=1\n")
    run_dir, logs = tmp_path / "run", [tmp_path / "a.log", tmp_path / "b.log"]
    args = (f"run.dir={run_dir}", "run.steps=100000", "run.log_every_steps=10", "engine.name=deepspeed",
            "engine.zero_stage=2", f"engine.dist_timeout_s={timeout_s}")
    procs = [deepspeed(a, 0, a, hostfile, logs[0], *args), deepspeed(b, 1, a, hostfile, logs[1], *args)]
    wait_for_line(r"^step 20/", logs[0], procs, RUN_LIMIT_S)
    b.link_down()
    dropped = time.monotonic()
    code = wait_all(procs[:1], logs[:1], timeout_s + EXIT_MARGIN_S)[0]
    elapsed = time.monotonic() - dropped
    print(f"host A exited {code} {elapsed:.1f} s after host B's link went down (dist_timeout_s={timeout_s})")
    assert code != 0, tails(logs)
    assert elapsed >= timeout_s * 0.9, f"{elapsed:.1f} s: exited before the timeout?\n" + tails(logs)
    assert re.search(r"Timed out waiting \d+ms", logs[0].read_text(errors="replace")), tails(logs)
