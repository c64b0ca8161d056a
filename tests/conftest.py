"""Process state no test may leak into the next: the SIGINT/SIGTERM dispositions and the hook for
unraisable exceptions. A command stopped in-process leaves SIGINT/SIGTERM ignored on purpose (it
is exiting, see streamnn.cli.common.sigterm_as_interrupt); left so in the test process, every
later child would inherit the ignored SIGINT and never stop on Ctrl-C."""
from __future__ import annotations

import signal
import sys
from collections.abc import Iterator

import pytest

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@pytest.fixture(autouse=True)
def _restore_signal_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    hook = sys.unraisablehook
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    sys.unraisablehook = hook
