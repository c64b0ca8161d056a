"""Start a command that holds at a known point (see ``blocker/sitecustomize.py``) and wait for it."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

BLOCKER = Path(__file__).parent / "blocker"


def start_blocked(cmd: list[str], marker: Path, timeout: float = 60, **block: str) -> subprocess.Popen:
    """Run ``cmd`` with the blocker's ``STREAMNN_TEST_*`` settings ``block``; return once it waits."""
    env = {**os.environ, **block, "STREAMNN_TEST_BLOCKED": str(marker),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(BLOCKER), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run ended or did not reach the blocking point: {proc.communicate()[1]}")
        time.sleep(0.01)
    return proc
