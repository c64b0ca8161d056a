"""Process state no test may leak into the next: the SIGINT/SIGTERM dispositions and the hook for
unraisable exceptions. A command run in-process leaves SIGINT/SIGTERM ignored on purpose once it
is past the point of no return (it is exiting, see streamnn.cli.common.sigterm_as_interrupt and
the end of streamnn.cli.pack.main); left so in the test process, every later child would inherit
the ignored SIGINT and never stop on Ctrl-C. So after every test, its fixtures' set-up and
tear-down included (module-scoped ones run inside the first and last test of their module), the
dispositions of the session's start are put back.

Numbers recorded in the repository (the 0.1.0 runs and ``expected.json`` in tests/fixtures) were
computed with OpenBLAS's Haswell kernels. OpenBLAS picks its kernels by CPU when it loads, and
another kernel rounds differently in the last bits; so on x86-64 with AVX2 and FMA the suite runs
with that kernel (set here, before NumPy loads; the children inherit it), and the tests that
compare with recorded numbers take the :func:`recorded_blas` fixture."""
from __future__ import annotations

import os
import platform
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

RECORDED_KERNEL = "Haswell"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
    os.environ["OPENBLAS_CORETYPE"] = RECORDED_KERNEL


@pytest.fixture()
def recorded_blas() -> None:
    """For a test that compares with numbers recorded in the repository: they hold bit for bit
    only with the BLAS kernel that computed them (skipped elsewhere; a failure under CI=true)."""
    from threadpoolctl import threadpool_info

    kernels = {pool.get("architecture") for pool in threadpool_info() if pool["user_api"] == "blas"}
    if kernels != {RECORDED_KERNEL}:
        message = f"recorded numbers hold with OpenBLAS's {RECORDED_KERNEL} kernels only; this NumPy runs {kernels}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)

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
