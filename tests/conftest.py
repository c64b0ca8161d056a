"""Process state no test may leak into the next: the SIGINT/SIGTERM dispositions and the hook for
unraisable exceptions. A command run in-process leaves SIGINT/SIGTERM ignored on purpose once it
is past the point of no return (it is exiting, see streamnn.cli.common.sigterm_as_interrupt and
the end of streamnn.cli.pack.main); left so in the test process, every later child would inherit
the ignored SIGINT and never stop on Ctrl-C. So after every test, its fixtures' set-up and
tear-down included (module-scoped ones run inside the first and last test of their module), the
dispositions of the session's start are put back."""
from __future__ import annotations

import signal
import sys
from collections.abc import Iterator

import pytest

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_AT_START = {sig: signal.getsignal(sig) for sig in _SIGNALS}
_HOOK_AT_START = sys.unraisablehook


@pytest.fixture(autouse=True, scope="session")
def _children_write_temporaries_under_pytests_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Children write their temporaries in pytest's own folder, not in /tmp: mpiexec (MPICH's
    hydra) leaves a topology file in $TMPDIR for every run."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("children-tmp")))
    yield
    patch.undo()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield
    for sig, handler in _AT_START.items():
        signal.signal(sig, handler)
    sys.unraisablehook = _HOOK_AT_START
