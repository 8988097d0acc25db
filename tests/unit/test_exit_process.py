"""``python -m trainer``'s exit after a multi-rank run: the exit code and every buffered line survive."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

SCRIPT = """
import logging, sys
import trainer.dist as dist
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
dist._STARTED = {started}
print("buffered line", end="")
sys.stdout.write(" and more")
logging.getLogger("t").info("a log record")
dist.exit_process(3)
print("not reached")
"""


@pytest.mark.parametrize("started", [True, False])
def test_exit_keeps_code_and_output(started):
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(started=started)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3
    assert done.stdout == "buffered line and more"
    assert "a log record" in done.stderr
