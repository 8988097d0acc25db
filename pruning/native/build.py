"""Build a C++ source of this folder into a shared library once per (source, compiler, CPU) and load it.

The library is cached in ``$DGMR_CACHE`` (default ``~/.cache/dgmr``) under a hash of the source, compiler
version, CPU flags (``-march=native``) and build flags; builds go to a temporary file renamed into place,
so concurrent ranks never load a half-written library.
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


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.processor())


@cache
def load(name: str) -> ctypes.CDLL | None:
    """``name``.cpp of this folder as a loaded library, or None (logged once) if it cannot be built."""
    if os.environ.get("DGMR_NATIVE", "1") == "0":  # asks for the pure NumPy/torch paths
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.info("no C++ compiler on PATH: %s runs in NumPy", name)
        return None
    source = HERE / f"{name}.cpp"
    code = source.read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(code + f"{version}{_cpu_flags()}{' '.join(FLAGS)}".encode()).hexdigest()[:16]
        target = Path(os.environ.get("DGMR_CACHE", Path.home() / ".cache" / "dgmr")) / f"{name}-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # removed whether or not it builds
                built = os.path.join(tmp, target.name)
                subprocess.run([compiler, *FLAGS, "-o", built, str(source)],
                               check=True, capture_output=True, text=True, timeout=300)
                os.replace(built, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exn:
        log.warning("building %s failed, using the NumPy path: %s", name, getattr(exn, "stderr", "") or exn)
        return None
