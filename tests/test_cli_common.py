"""The one error boundary of the commands (streamnn.cli.common): a stop signal stays a stop,
whatever exception a C library makes of the KeyboardInterrupt raised inside it."""
from __future__ import annotations

import subprocess
import sys

import pytest

# Run in a child: after a stop, sigterm_as_interrupt leaves SIGINT/SIGTERM ignored on purpose
# (the process is exiting), which must not leak into the test process or its later children.
SCRIPT = """
import os, signal, sys, time
from streamnn.cli.common import sigterm_as_interrupt, user_errors
with sigterm_as_interrupt():
    with user_errors("interrupted; nothing written"):
        try:
            if sys.argv[1] != "none":
                os.kill(os.getpid(), getattr(signal, sys.argv[1]))
            time.sleep(0.5)
            raise KeyboardInterrupt  # (never reached with a signal: its handler raises in sleep)
        except KeyboardInterrupt:  # as h5py's Cython code does: the stop becomes another exception
            raise TypeError("Operation not defined for data type class") from None
"""


@pytest.mark.parametrize("sig,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stop_turned_into_another_exception_is_still_the_stop(sig, status):
    r = subprocess.run([sys.executable, "-c", SCRIPT, sig], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (status, "Error: interrupted; nothing written\n")


def test_without_a_stop_the_exception_is_not_disguised():
    r = subprocess.run([sys.executable, "-c", SCRIPT, "none"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "TypeError: Operation not defined" in r.stderr
