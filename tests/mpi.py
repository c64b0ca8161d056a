"""Start real ``mpiexec -n K`` jobs from tests (the MPICH of ``pip install '.[mpi]'``).

MPI tests skip, saying why, only on a developer's machine without mpi4py or mpiexec; in CI
(``CI=true``) a missing MPI fails them instead: CI installs ``.[test,mpi]`` and must run them.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mpiexec_path() -> str | None:
    """The mpiexec next to this Python (a venv with the mpich wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


def require_mpi() -> str:
    """The mpiexec to use; skips (developer machine) or fails (CI) when MPI is missing."""
    missing = [what for what, ok in (("mpi4py", importlib.util.find_spec("mpi4py") is not None),
                                     ("mpiexec", mpiexec_path() is not None)) if not ok]
    if missing:
        why = f"{' and '.join(missing)} not installed (pip install -e '.[test,mpi]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the MPI tests, but {why}")
        pytest.skip(why)
    return mpiexec_path()  # type: ignore[return-value]


def run_ranks(n: int, code: str, *args: str, timeout: float = 60, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run Python ``code`` (dedented; argv[1:] = ``args``) on ``n`` ranks; returns (result, seconds)."""
    return run_mpiexec(n, [sys.executable, "-c", textwrap.dedent(code), *args], timeout=timeout, env=env, cwd=cwd)


def run_mpiexec(n: int, cmd: list[str], *, timeout: float = 60, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``mpiexec -n n cmd...``; returns (result with text stdout/stderr, seconds it took)."""
    return run_mpmd([cmd] * n, timeout=timeout, env=env, cwd=cwd)


def run_mpmd(cmds: list[list[str]], *, timeout: float = 60, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """One rank per command, rank r running ``cmds[r]`` (an MPMD line ``mpiexec -n 1 a : -n 1 b``; equal
    commands are one ``-n K`` group); returns (result with text stdout/stderr, seconds it took)."""
    mpiexec = require_mpi()
    groups: list[list] = []
    for cmd in cmds:
        if groups and groups[-1][1] == cmd:
            groups[-1][0] += 1
        else:
            groups.append([1, cmd])
    line = [t for i, (n, cmd) in enumerate(groups) for t in [":"] * bool(i) + ["-n", str(n), *cmd]]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    start = time.monotonic()
    result = subprocess.run([mpiexec, *line], capture_output=True, text=True, timeout=timeout,
                            env=full_env, cwd=cwd, stdin=subprocess.DEVNULL)
    return result, time.monotonic() - start
