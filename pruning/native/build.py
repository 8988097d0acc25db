"""Build a C++ source of this folder into a shared library once per (source, compiler, CPU) and load it.

The library goes to ``$DGMR_CACHE`` (default ``~/.cache/dgmr``) under a name hashed from the
source, the compiler's version and the CPU flags (it is built with ``-march=native``; nodes with
other CPUs sharing a home directory get their own). Concurrent ranks build into temporary files
and rename, so they never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")


def enabled() -> bool:
    """False when ``DGMR_NATIVE=0`` asks for the pure NumPy/torch paths."""
    return os.environ.get("DGMR_NATIVE", "1") != "0"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("DGMR_CACHE", Path.home() / ".cache" / "dgmr"))


@cache
def load(name: str) -> ctypes.CDLL | None:
    """``name``.cpp of this folder as a loaded library, or None (logged once) if it cannot be built."""
    if not enabled():
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.info("no C++ compiler on PATH: %s runs in NumPy", name)
        return None
    source = (HERE / f"{name}.cpp").read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(source + version.encode() + _cpu_flags().encode() + " ".join(FLAGS).encode())
        target = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                subprocess.run([compiler, *FLAGS, "-o", tmp, str(HERE / f"{name}.cpp")],
                               check=True, capture_output=True, text=True, timeout=300)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exn:
        detail = getattr(exn, "stderr", "") or exn
        log.warning("building %s failed, using the NumPy path: %s", name, detail)
        return None
