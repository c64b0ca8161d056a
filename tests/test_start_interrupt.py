"""Ctrl-C in the first fraction of a second (while a command imports numpy, h5py, OpenCV): exit 130,
no traceback, nothing written, for all five commands, through their console-script entry points."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from streamnn.cli.train import main as train_main
from streamnn.run.folder import LATEST, LOCK_FILE
from tinystore import make_store

DELAYS = (0.0, 0.03, 0.1, 0.2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    store = make_store(folder / "s.h5")
    r = CliRunner().invoke(train_main, [str(store), "--out", str(folder / "run"), "--epochs", "1", "--hidden", "4",
                                        "-q", "--no-progress"])
    assert r.exit_code == 0, r.output
    for cls in ("cats", "dogs"):
        (folder / "src" / cls).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(folder / "src" / cls / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    return folder


def _commands(folder: Path, out: Path):
    ck = str(folder / "run" / LATEST)
    return {
        "pack": [str(folder / "src"), "-o", str(out / "new.h5"), "--size", "4"],
        "info": [str(folder / "s.h5")],
        "train": [str(folder / "s.h5"), "--out", str(out / "run"), "--epochs", "1", "--no-progress"],
        "eval": [ck, str(folder / "s.h5"), "--errors", str(out / "errors.png")],
        "predict": [ck, str(folder / "src")],
    }


def _start(inputs: Path, tmp_path: Path, name: str, delay: float, attempt: int) -> list:
    out = tmp_path / f"{name}-{delay}-{attempt}"
    out.mkdir()
    args = _commands(inputs, out)[name]
    marker = tmp_path / f"{name}-{delay}-{attempt}.started"
    # The marker is made as the very last step before the entry point. A signal that lands in this
    # wrapper itself, between the marker and the entry point, tests nothing: exit 99 ("missed").
    # One that escaped the command (a deeper traceback) is re-raised: a failure.
    code = (f"import os, sys\nfrom streamnn.cli import streamnn_{name}\nsys.argv[0] = 'streamnn-{name}'\n"
            f"try:\n    os.close(os.open({str(marker)!r}, os.O_CREAT | os.O_WRONLY)); streamnn_{name}()\n"
            "except KeyboardInterrupt as exc:\n"
            "    if exc.__traceback__.tb_next is not None:\n        raise\n    os._exit(99)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=out)
    return [name, delay, out, proc, marker, None, False]  # ..., when to signal, signalled in time


def test_ctrl_c_while_starting_exits_130_without_traceback_or_output(inputs, tmp_path):
    """SIGINT at several small delays after the entry point was reached (the interpreter's own
    start-up before it, site imports included, is Python's and not covered). Each signal is
    sent when due; a command that had already ended by then (a loaded machine can delay the
    signal past a whole run) did not test anything and is run again, up to 3 times."""
    cases = [(name, delay) for delay in DELAYS for name in _commands(inputs, tmp_path)]
    for attempt in range(3):
        pending = [_start(inputs, tmp_path, name, delay, attempt) for name, delay in cases]
        deadline = time.monotonic() + 60
        while not all(p[6] or p[3].poll() is not None for p in pending) and time.monotonic() < deadline:
            now = time.monotonic()
            for p in pending:
                if p[5] is None and p[4].exists():
                    p[5] = now + p[1]
                if p[5] is not None and not p[6] and now >= p[5] and p[3].poll() is None:
                    p[3].send_signal(signal.SIGINT)
                    p[6] = True
            time.sleep(0.002)
        missed = []
        for name, delay, out, proc, _, _, signalled in pending:
            stdout, stderr = proc.communicate(timeout=60)
            if not signalled or proc.returncode == 99:
                missed.append((name, delay))
                continue
            what = f"{name} at {delay}s: rc {proc.returncode}, stderr {stderr!r}"
            assert proc.returncode == 130, what
            assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, what
            assert stderr.startswith("Error: interrupted") and stderr.count("\n") == 1, what
            # nothing written: no store, no grid, no run file (a lock file alone may be left by train)
            left = [p.name for p in out.rglob("*") if p.is_file() and p.name != LOCK_FILE]
            assert left == [], what
        cases = missed
        if not cases:
            break
    assert not cases, f"ended before their SIGINT could be sent, 3 times: {cases}"


def test_console_scripts_enter_through_the_light_wrapper():
    """The entry points import nothing heavy before they can catch an interrupt."""
    code = ("import sys, streamnn.cli; heavy = [m for m in ('numpy', 'h5py', 'cv2', 'click', 'matplotlib') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    scripts = dict(re.findall(r'^(streamnn-\w+) = "([^"]+)"', pyproject, flags=re.M))
    assert scripts == {f"streamnn-{n}": f"streamnn.cli:streamnn_{n}" for n in ("pack", "info", "train", "eval", "predict")}
