"""How many BLAS threads a process uses: the CPUs it may run on, the loader's needs, the ranks.

Policy (``threads="auto"``, the default of ``streamnn-train`` / ``streamnn-eval`` and of the
``threads`` key of a :class:`~streamnn.run.trainer.Trainer` configuration)::

    usable  = min(CPUs in this process's affinity mask, ceil(cgroup CPU quota))
    ranks > 1 (mpiexec):        1 BLAS thread per rank
    training from a store:      usable - 1   (at least 1): one CPU for the loader's threads
    otherwise (evaluation):     usable

A number (``threads=2``, ``--threads 2``) is used as given. The count is set at run time with
``threadpoolctl`` (OpenBLAS, MKL or BLIS, whichever NumPy loaded), so it overrides
``OPENBLAS_NUM_THREADS`` and friends.

Why the loader's CPU. Training reads, augments and standardizes the next batch in the loader's
thread (or its pread threads) while the model computes. On 2 CPUs, 2 BLAS threads then share
the machine with that thread and with anything else running; OpenBLAS's threads wait for each
other by spinning, so a BLAS thread that loses its core stalls the step: measured on this
2-CPU machine with the other CPU busy, a CNN step took 2.6x longer with 2 BLAS threads than
with 1, the MLP's 2.2x (docs/performance.md, ``tools/bench_threads.py``).

The count is deterministic (never from the load): OpenBLAS's results depend on it in the last
bits (its threads split the products differently), so a rerun or a resumed run on the same
machine with the same setting gives bit-identical numbers; a run resumed with another
``--threads`` (or "auto" on another machine) continues correctly but not bit-identically.
"""
from __future__ import annotations

import math
import os
from typing import Any

from streamnn.errors import StreamnnError

AUTO = "auto"


def cgroup_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None when unlimited."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        if quota != "max" and float(period) > 0:
            return float(quota) / float(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota_us = float(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = float(f.read())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(root: str = "/sys/fs/cgroup") -> int:
    """min(CPUs this process may run on, the cgroup quota rounded up); at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_quota(root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def check_threads(value: Any) -> str | int:
    """``"auto"`` or a positive integer (a string of digits accepted); else StreamnnError."""
    if value is None or value == AUTO:
        return AUTO
    if isinstance(value, bool):
        raise StreamnnError(f"threads must be 'auto' or a positive number, not {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise StreamnnError(f"threads must be 'auto' or a positive number, not {value!r}") from None
    if n < 1 or str(n) != str(value).strip():
        raise StreamnnError(f"threads must be 'auto' or a positive number, not {value!r}")
    return n


def choose_threads(threads: Any = AUTO, *, world_size: int = 1, loader: bool = False,
                   cpus: int | None = None) -> int:
    """The BLAS thread count for ``threads`` ("auto" or a number): see the module docstring."""
    chosen = check_threads(threads)
    if chosen != AUTO:
        return int(chosen)
    if world_size > 1:
        return 1
    cpus = usable_cpus() if cpus is None else int(cpus)
    return max(1, cpus - (1 if loader else 0))


_CONTROLLER: Any = None


def _blas() -> list[Any]:
    global _CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a core dependency; without it the counts stay as they are
        return []
    if _CONTROLLER is None:
        import numpy  # noqa: F401  (loads its BLAS, so that the controller finds it)

        _CONTROLLER = ThreadpoolController()
    return list(_CONTROLLER.select(user_api="blas").lib_controllers)


def set_blas_threads(n: int) -> None:
    """Use ``n`` threads in every BLAS library loaded in this process (from now on)."""
    for lib in _blas():
        lib.set_num_threads(int(n))


def blas_threads() -> int | None:
    """The BLAS thread count in use (the first library's), None when no BLAS was found."""
    libs = _blas()
    return int(libs[0].num_threads) if libs else None


def use_threads(threads: Any = AUTO, **kwargs: Any) -> str:
    """Set the BLAS threads :func:`choose_threads` gives; returns a line saying so."""
    n = choose_threads(threads, **kwargs)
    set_blas_threads(n)
    return f"{n} BLAS thread{'s' if n > 1 else ''} (--threads {threads})"
