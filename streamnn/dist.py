"""Data-parallel communication: a :class:`Comm` for one process, or for the ranks of an MPI job.

Usage::

    comm = world()                  # MPI under `mpiexec -n K` (K > 1), else one process
    comm.allreduce(grads, stats)    # in-place sums over the ranks, started together
    blob = comm.broadcast_bytes(blob if comm.rank == 0 else b"")
    reports = comm.gather_bytes(report)  # every rank's bytes, on rank 0

Only mpi4py's buffer calls are used (the lowercase ones pickle). Every collective is
non-blocking and polled against a deadline (:data:`TIMEOUT`), and a rank that leaves with an
error aborts the job (:func:`leave`) unless every rank raised it (:class:`AgreedError`). The
design (launchers, faults, polling) is in docs/distributed.md, "How the communicator works".
"""
from __future__ import annotations

import array
import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, Protocol, TypeVar

import numpy as np

from streamnn.errors import StreamnnError

T = TypeVar("T")
#: Seconds a collective may wait for the other ranks before the job is aborted.
TIMEOUT = 300.0
#: Polling a collective: spin this long, then test every POLL_SECONDS; once a wait has lasted
#: IDLE_SECONDS, every IDLE_POLL_SECONDS (docs/distributed.md, "Polling").
SPIN_SECONDS = 0.001
POLL_SECONDS = 1e-4
IDLE_SECONDS = 1.0
IDLE_POLL_SECONDS = 0.005
#: Longest wait, before an abort, for the launcher to read what the rank printed.
DRAIN_SECONDS = 2.0
FORWARD_SECONDS = 0.05
INSTALL_HINT = "pip install 'streamnn[mpi]' (mpi4py and MPICH), or mpi4py built for your cluster's MPI"
#: (size, rank) variables of the launchers, first match wins.
LAUNCHER_VARS = (("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                 ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"))


class AgreedError(StreamnnError):
    """An error every rank raises at the same point, after agreeing on it: reported once, no abort.

    ``where`` is None when rank 0 reports it (every rank has it, or rank 0 has it), else the ranks
    that have it (``"rank 1 of 2"``): the rank holding the message (:func:`agreed`) reports it,
    prefixed with ``where``; the others raise it with an empty message and print nothing.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, *, where: str | None = None) -> None:
        super().__init__(message, path)
        self.where = where


class Comm(Protocol):
    """What training and packing need from their ranks: sums, broadcasts from rank 0, gathers, a
    barrier, an abort."""

    rank: int
    size: int

    def allreduce(self, *buffers: np.ndarray) -> None:
        """Replace each contiguous array by its elementwise sum over the ranks (all at once)."""

    def broadcast(self, buffer: np.ndarray) -> None:
        """Overwrite ``buffer`` with rank 0's (same shape and dtype on every rank)."""

    def allgather(self, buffer: np.ndarray) -> None:
        """Overwrite every rank's :func:`part` of the flat ``buffer`` with that rank's (in place)."""

    def broadcast_bytes(self, data: bytes) -> bytes:
        """Rank 0's ``data`` on every rank (what the others pass is ignored)."""

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on rank 0 (an empty list on the others)."""

    def local_size(self) -> int:
        """How many ranks of the job run on this machine (this one included)."""

    def barrier(self) -> None:
        """Return once every rank has called it."""

    def abort(self, status: int) -> NoReturn:
        """End every rank of the job now with ``status``."""


class SingleComm:
    """One process: every collective is the identity."""

    rank, size = 0, 1

    def allreduce(self, *buffers: np.ndarray) -> None:
        pass

    def broadcast(self, buffer: np.ndarray) -> None:
        pass

    def allgather(self, buffer: np.ndarray) -> None:
        pass

    def broadcast_bytes(self, data: bytes) -> bytes:
        return bytes(data)

    def gather_bytes(self, data: bytes) -> list[bytes]:
        return [bytes(data)]

    def local_size(self) -> int:
        return 1

    def barrier(self) -> None:
        pass

    def abort(self, status: int) -> NoReturn:
        sys.exit(status)


class MPIComm:
    """The ranks of ``MPI.COMM_WORLD`` through mpi4py buffer calls, each with a deadline."""

    def __init__(self, timeout: float | None = None) -> None:
        from mpi4py import MPI  # imported here only: importing it initializes MPI

        self._MPI = MPI
        self._comm = MPI.COMM_WORLD
        self.rank, self.size = self._comm.Get_rank(), self._comm.Get_size()
        self.timeout = float(os.environ.get("STREAMNN_MPI_TIMEOUT", TIMEOUT) if timeout is None else timeout)

    def _wait(self, requests: list[Any], what: str) -> None:
        start = time.monotonic()
        while not self._MPI.Request.Testall(requests):
            waited = time.monotonic() - start
            if waited > self.timeout:
                print(f"Error: rank {self.rank}: no answer from the other ranks for {self.timeout:g} s in {what} "
                      "(a rank hung or was stopped); aborting the job", file=sys.stderr, flush=True)
                self.abort(1)
            if waited > SPIN_SECONDS:
                time.sleep(POLL_SECONDS if waited < IDLE_SECONDS else IDLE_POLL_SECONDS)

    def allreduce(self, *buffers: np.ndarray) -> None:
        for b in buffers:
            if not b.flags.c_contiguous:
                raise ValueError("allreduce needs C-contiguous arrays")
        self._wait([self._comm.Iallreduce(self._MPI.IN_PLACE, b, op=self._MPI.SUM) for b in buffers], "allreduce")

    def broadcast(self, buffer: np.ndarray) -> None:
        self._wait([self._comm.Ibcast(buffer, root=0)], "broadcast")

    def allgather(self, buffer: np.ndarray) -> None:
        parts = [part(buffer.size, r, self.size) for r in range(self.size)]
        from mpi4py.util.dtlib import from_numpy_dtype

        spec = [buffer, [p.stop - p.start for p in parts], [p.start for p in parts], from_numpy_dtype(buffer.dtype)]
        self._wait([self._comm.Iallgatherv(self._MPI.IN_PLACE, spec)], "allgather")

    def broadcast_bytes(self, data: bytes) -> bytes:
        n = np.array([len(data) if self.rank == 0 else 0], np.int64)
        self.broadcast(n)
        buf = np.frombuffer(bytearray(data), np.uint8) if self.rank == 0 else np.empty(int(n[0]), np.uint8)
        self.broadcast(buf)
        return buf.tobytes()

    def gather_bytes(self, data: bytes) -> list[bytes]:
        sizes = np.zeros(self.size, np.int64)
        self._wait([self._comm.Igather(np.array([len(data)], np.int64), sizes, root=0)], "gather")
        send = np.frombuffer(bytearray(data), np.uint8)
        if self.rank != 0:
            self._wait([self._comm.Igatherv(send, None, root=0)], "gather")
            return []
        recv = np.empty(int(sizes.sum()), np.uint8)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        self._wait([self._comm.Igatherv(send, [recv, sizes.tolist(), offsets, self._MPI.BYTE], root=0)], "gather")
        return [recv[o:o + n].tobytes() for o, n in zip(offsets, sizes.tolist())]

    def local_size(self) -> int:
        """From the ranks' processor (host) names, gathered and counted by rank 0."""
        names = self.gather_bytes(self._MPI.Get_processor_name().encode("utf-8", "surrogateescape"))
        counts = np.array([names.count(name) for name in names] if self.rank == 0 else [0] * self.size, np.int64)
        self.broadcast(counts)
        return int(counts[self.rank])

    def barrier(self) -> None:
        self._wait([self._comm.Ibarrier()], "barrier")

    def abort(self, status: int) -> NoReturn:
        _abort_job(self._comm, status)


def part(n: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s contiguous, balanced part of ``n`` entries split over ``size`` ranks:
    ``[n*rank//size, n*(rank+1)//size)`` (the layout of a sharded store's rows relies on it)."""
    return slice(n * rank // size, n * (rank + 1) // size)


def launcher_world(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, size)`` that an MPI launcher put in the environment; ``(0, 1)`` outside one."""
    env = os.environ if environ is None else environ
    for size_var, rank_var in LAUNCHER_VARS:
        if size_var in env:
            try:
                return int(env.get(rank_var, "0")), int(env[size_var])
            except ValueError:
                raise StreamnnError(f"the MPI launcher set {size_var}={env[size_var]!r}, "
                                    f"{rank_var}={env.get(rank_var)!r}: not integers") from None
    return 0, 1


def world(timeout: float | None = None) -> Comm:
    """The communicator of this run: MPI when a launcher started K > 1 ranks, else one process."""
    rank, size = launcher_world()
    if size <= 1:
        return SingleComm()
    try:
        import mpi4py  # noqa: F401 - only whether it is there
    except ImportError:
        raise AgreedError(f"started by mpiexec as rank {rank} of {size}, but mpi4py is not installed: "
                            f"{INSTALL_HINT}") from None
    comm = MPIComm(timeout)
    if comm.size != size:
        raise AgreedError(f"the launcher started {size} ranks but mpi4py's MPI sees {comm.size}: mpi4py is "
                            "built for another MPI than this mpiexec (use the mpiexec of the MPI mpi4py uses)")
    return comm


def agreed(comm: Comm, step: Callable[[], T]) -> T:
    """Run ``step`` on every rank, then agree (one small allreduce) that it worked everywhere.

    If it failed on some rank, every rank raises :class:`AgreedError`. The message is held by one
    rank per distinct error (the first rank that has it; errors are compared by a digest of their
    text): rank 0 when it has it (rank 0 speaks for the job: a step only rank 0 does, a bad input
    every rank has), else the first rank that failed, with ``where`` naming the ranks that have
    it (``"rank 1 of 2"``). The others raise it with no message (printed by nobody), so a bad
    input gives one line, not K, and an error on one rank only is still printed, by that rank.
    """
    if comm.size == 1:
        return step()
    error: BaseException | None = None
    result: Any = None
    try:
        result = step()
    except (StreamnnError, OSError) as exc:
        error = exc
    codes = np.zeros(comm.size, np.int64)
    codes[comm.rank] = _error_code(error) if error is not None else 0
    comm.allreduce(codes)
    if codes.any():
        if error is None or int(np.flatnonzero(codes == codes[comm.rank])[0]) != comm.rank:
            raise AgreedError("")
        having = np.flatnonzero(codes == codes[comm.rank]).tolist()
        where = None if comm.rank == 0 else \
            f"rank{'s' if len(having) > 1 else ''} {', '.join(map(str, having))} of {comm.size}"
        raise AgreedError(str(error) if isinstance(error, StreamnnError) else "", where=where) from error
    return result


def _error_code(error: BaseException) -> int:
    """A positive 63-bit digest of an error's kind and text (equal errors on two ranks: equal codes)."""
    text = f"{type(error).__name__}:{error}:{getattr(error, 'filename', None)}".encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1 | 1


def canonical_digest(value: Any) -> str:
    """sha256 hex of ``value`` as canonical JSON (sorted keys, no spaces; NumPy values as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return {"array": str(v.dtype), "shape": list(v.shape),
                    "sha256": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()}
        if isinstance(v, (np.generic, tuple)):
            return v.tolist() if isinstance(v, np.generic) else list(v)
        return repr(v)

    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=plain)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def agree(comm: Comm, what: str, items: Mapping[str, Any]) -> None:
    """Raise :class:`AgreedError` on every rank unless every rank passed equal ``items``.

    Each item is compared by its :func:`canonical_digest`: rank 0's table of digests is broadcast
    (bytes of JSON, not pickle), every rank marks the items in which it differs, and one allreduce
    of the marks tells every rank which items differ, and on which ranks. All of it is buffer
    calls under the communicator's deadline. The message names the items (``what``: what the
    ranks should run alike, for the message), e.g. "the ranks do not run the same training: seed
    differs on rank 1 of 2 from rank 0; ...".
    """
    if comm.size == 1:
        return
    mine = {str(k): canonical_digest(v) for k, v in items.items()}
    theirs = json.loads(comm.broadcast_bytes(json.dumps(mine, sort_keys=True).encode()).decode())
    names = sorted(theirs)
    marks = np.zeros(len(names) + 1 + comm.size, np.int64)
    for i, name in enumerate(names):
        marks[i] = mine.get(name) != theirs[name]
    marks[len(names)] = bool(set(mine) - set(theirs))
    marks[len(names) + 1 + comm.rank] = marks[:len(names) + 1].any()
    comm.allreduce(marks)
    if not marks.any():
        return
    differ = [n for i, n in enumerate(names) if marks[i]] + (["other keys"] if marks[len(names)] else [])
    ranks = np.flatnonzero(marks[len(names) + 1:]).tolist()
    raise AgreedError(f"the ranks do not run the same {what}: {', '.join(differ)} "
                      f"differ{'s' if len(differ) == 1 else ''} on rank{'s' if len(ranks) > 1 else ''} "
                      f"{', '.join(map(str, ranks))} of {comm.size} from rank 0; give every rank the same "
                      "arguments and the same store")


def leave(status: int) -> NoReturn:
    """Exit this rank with ``status``; under MPI with K > 1 ranks, end the whole job (``MPI_Abort``),
    since the others may be waiting in a collective for this rank for ever."""
    if launcher_world()[1] > 1 and "mpi4py.MPI" in sys.modules:
        _abort_job(sys.modules["mpi4py.MPI"].COMM_WORLD, status)
    sys.stderr.flush()
    sys.exit(status)


def _abort_job(comm: Any, status: int) -> NoReturn:
    """``MPI_Abort`` once what this rank printed has reached the launcher: the launcher kills the
    ranks and exits on the abort, dropping output still in the pipes from the ranks (measured with
    MPICH's hydra: the one ``Error:`` line was lost in about one run in ten)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        _drain(stream)
    comm.Abort(status)
    raise SystemExit(status)  # not reached: Abort ends the process


def _drain(stream: Any, limit: float = DRAIN_SECONDS) -> None:
    """Wait (at most ``limit`` seconds) until the reader of the pipe behind ``stream`` has read
    everything written to it; return at once if the stream is not a pipe."""
    try:
        import fcntl
        import termios

        fd = stream.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
    except (ImportError, OSError, ValueError, AttributeError):  # not POSIX, or not a pipe
        return
    unread = array.array("i", [0])
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            fcntl.ioctl(fd, termios.FIONREAD, unread)
        except OSError:
            return
        if unread[0] == 0:
            time.sleep(FORWARD_SECONDS)  # read; let the launcher pass it on before the abort
            return
        time.sleep(0.01)
