"""How many threads a process computes with: the CPUs it may run on, the loader's needs, the ranks.

Policy (``threads="auto"``, the default of ``streamnn-train`` / ``streamnn-eval`` and of the
``threads`` key of a :class:`~streamnn.run.trainer.Trainer` configuration)::

    usable  = min(CPUs in this process's affinity mask, ceil(cgroup CPU quota))
    ranks > 1 (mpiexec):        1 thread per rank
    training from a store:      usable - 1   (at least 1): one CPU for the loader's threads
    otherwise (evaluation):     usable

A number (``threads=2``, ``--threads 2``) is used as given. The count goes to one of two places:

* the BLAS library (set at run time with ``threadpoolctl``: OpenBLAS, MKL or BLIS, whichever
  NumPy loaded, so it overrides ``OPENBLAS_NUM_THREADS`` and friends), for models that compute
  in whole-batch products (dense networks, conv nets of the ``"im2col"`` kernel);
* or this module's :class:`WorkerPool` of Python threads, with BLAS at 1 thread, for models whose
  layers split the batch into blocks themselves (``Conv2D(algo="blocked")``, the kernel of new CNN
  runs; max-pooling and batch norm then work in blocks too): :func:`run_blocks` hands the blocks to the
  pool's threads, each block's products run on one BLAS thread in the thread that took it (NumPy
  releases the GIL in products, copies and elementwise operations). Such a model's numbers do
  not depend on the count at all (every block is computed alike, whichever thread takes it, and
  blocks are combined in a fixed order), and a thread that waits for a CPU holds up only the
  blocks it took: the others take the rest.

OpenCV (the loader's uint8-to-float32 conversion, the adapters' channel turns) is set to one
thread: it runs in the loader's thread, never in a pool of OpenCV's on the CPUs counted above
(never called in a forked child: OpenCV's pool, remade there, waits for the parent's threads).

Why the loader's CPU. Training reads, augments and standardizes the next batch in the loader's
thread (or its pread threads) while the model computes. On 2 CPUs, 2 BLAS threads then share
the machine with that thread and with anything else running; OpenBLAS's threads wait for each
other by spinning, so a BLAS thread that loses its core stalls the step: measured on this
2-CPU machine with the other CPU busy, a CNN step took 2.6x longer with 2 BLAS threads than
with 1, the MLP's 2.2x (docs/performance.md, ``tools/bench_threads.py``).

The count is deterministic (never from the load): OpenBLAS's results depend on it in the last
bits (its threads split the products differently), so a rerun or a resumed run on the same
machine with the same setting gives bit-identical numbers; a run resumed with another
``--threads`` (or "auto" on another machine) continues correctly but not bit-identically, except
for the models that compute on the worker pool, bit-identical at any count.
"""
from __future__ import annotations

import itertools
import math
import os
import queue
import threading
from typing import Any, Callable

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


def computes_in_blocks(model: Any) -> bool:
    """Whether a model's layers split batches into blocks on the worker pool (``uses_workers``)."""
    return any(getattr(layer, "uses_workers", False) for layer in getattr(model, "layers", ()))


def use_threads(threads: Any = AUTO, *, model: Any = None, **kwargs: Any) -> str:
    """Set the threads :func:`choose_threads` gives for ``model``: worker threads and one BLAS thread
    when it computes in blocks (:func:`computes_in_blocks`), else BLAS threads (and one worker);
    returns a line saying so."""
    import cv2

    n = choose_threads(threads, **kwargs)
    blocks = computes_in_blocks(model)
    set_blas_threads(1 if blocks else n)
    set_workers(n if blocks else 1)
    cv2.setNumThreads(1)
    what = "worker thread" if blocks else "BLAS thread"
    return f"{n} {what}{'s' if n > 1 else ''} (--threads {threads})"


# -- the worker pool -------------------------------------------------------------------------------
class WorkerPool:
    """``size`` threads that run ``fn(0), ..., fn(count - 1)`` between them; the caller is one of them.

    Each thread takes the next block index until none is left (a thread that waits for a CPU takes
    fewer), so ``fn`` must give the same result whichever thread runs it: write only to its block's
    part of the outputs and to buffers of its own thread. ``run`` returns when every block is done
    and raises the first exception of any block. Not reentrant: ``fn`` may not call ``run``.
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, int(size))
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(self.size - 1)]
        for i, jobs in enumerate(self._jobs):
            threading.Thread(target=self._serve, args=(jobs,), name=f"streamnn-worker-{i + 1}", daemon=True).start()

    def _serve(self, jobs: queue.SimpleQueue) -> None:
        while (job := jobs.get()) is not None:
            self._done.put(_take_blocks(*job))

    def run(self, fn: Callable[[int], None], count: int) -> None:
        helpers = min(self.size, count) - 1
        if helpers <= 0:
            for i in range(count):
                fn(i)
            return
        job = (fn, itertools.count(), count)
        for jobs in self._jobs[:helpers]:
            jobs.put(job)
        errors = []
        try:
            errors.append(_take_blocks(*job))
        finally:  # the helpers finish their blocks before anything else touches the buffers
            errors += [self._done.get() for _ in range(helpers)]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def close(self) -> None:
        """End the threads (after the blocks they are running)."""
        for jobs in self._jobs:
            jobs.put(None)
        self._jobs = []
        self.size = 1


def _take_blocks(fn: Callable[[int], None], counter: Any, count: int) -> BaseException | None:
    try:
        while (i := next(counter)) < count:  # next() of an itertools.count is atomic under the GIL
            fn(i)
    except BaseException as exc:  # noqa: BLE001 - handed to the caller of run(), which raises it
        return exc
    return None


_POOL = WorkerPool(1)


def _forget_pool_in_child() -> None:
    """A forked child has none of its parent's threads: it starts with no helper threads."""
    global _POOL
    _POOL = WorkerPool(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def set_workers(n: int) -> None:
    """Use ``n`` worker threads in :func:`run_blocks` from now on (the calling thread included)."""
    global _POOL
    if int(n) != _POOL.size:
        _POOL.close()
        _POOL = WorkerPool(int(n))


def workers() -> int:
    """The worker threads :func:`run_blocks` uses (the calling thread included)."""
    return _POOL.size


def run_blocks(fn: Callable[[int], None], count: int) -> None:
    """``fn(i)`` for every block ``i < count``, on the worker pool (:class:`WorkerPool`)."""
    _POOL.run(fn, count)
