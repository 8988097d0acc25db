"""Two "hosts" on this machine: network namespaces joined by a veth pair (needs root and ``ip netns``).

Host A gets 10.77.x.1/24 on its veth end, host B 10.77.x.2/24; each namespace also has its own ``lo``.
Nothing is routed to the outside: the addresses exist inside the namespaces only. Processes are
started with ``ip netns exec`` (which execs, so the Popen pid is the command itself) in a new
session, and are stopped by their process group; whatever else is left inside a namespace (torchrun
puts its workers in sessions of their own) is killed by pid from ``ip netns pids`` before the
namespace is deleted, which also deletes the veth pair.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (None when they can): checked by really adding one."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return f"network namespaces need root (uid is {os.geteuid()})"
    probe = f"dgmrprobe{os.getpid()}"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"`ip netns add` failed: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    """One namespace: its name, its veth end and that end's address."""

    netns: str
    ifname: str
    addr: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, command: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
        """Start ``command`` inside this host, stdout+stderr to ``log``, in its own process group."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *command], env=env, cwd=cwd,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process now living in this namespace (ours only: we created it)."""
        done = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=30)
        return [int(p) for p in done.stdout.split()]

    def kill_all(self) -> None:
        """SIGKILL every process in the namespace, by pid: a host that dies without a word."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.wait(timeout=30)

    def link_down(self) -> None:
        """Drop this host's link silently: no FIN, no RST reaches the peer."""
        _ip("-n", self.netns, "link", "set", self.ifname, "down")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM each started process group, SIGKILL what is left after ``grace_s``, then the stragglers."""
        for proc in self.procs:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        self.kill_all()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the group id is the pid: start_new_session made it a leader
    except ProcessLookupError:
        pass


@contextmanager
def two_hosts(tag: str = "") -> Iterator[tuple[Host, Host]]:
    """Hosts A and B on a private /24; removed on exit, also when the body raises."""
    # Names unique per test process so parallel sessions never collide; interface names are <= 15 chars.
    suffix = f"{os.getpid() % 100000}{tag}"
    subnet = 16 + os.getpid() % 200  # 10.77.<subnet>.0/24: distinct per process as well
    a = Host(f"dgmr{suffix}a", f"ve{suffix}a", f"10.77.{subnet}.1")
    b = Host(f"dgmr{suffix}b", f"ve{suffix}b", f"10.77.{subnet}.2")
    created: list[Host] = []
    try:
        for host in (a, b):
            _ip("netns", "add", host.netns)
            created.append(host)
        _ip("link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
        for host in (a, b):
            _ip("link", "set", host.ifname, "netns", host.netns)
            _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
            _ip("-n", host.netns, "link", "set", host.ifname, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for host in created:
            host.stop()
        for host in created:
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)
        # A veth end still in the root namespace (setup failed half way) is not removed by the above.
        subprocess.run(["ip", "link", "del", a.ifname], capture_output=True, timeout=30)
