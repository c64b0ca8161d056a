"""The decoding pool (:class:`Decoder`): this process and worker processes decode chunks of files,
results read back in submission order, so the output does not depend on the number of workers.

Workers are ``subprocess`` children running :func:`streamnn.pack.worker.worker_main` (no fork,
no multiprocessing, no pickle: paths go as bytes, results as JSON and raw arrays). They start
with SIGINT and SIGTERM blocked, so only this process acts on them, and die with it; a worker
that dies makes packing fail with a message instead of hanging.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import select
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import cv2

from streamnn.errors import StreamnnError
from streamnn.pack.decode import signals_deferred
from streamnn.pack.worker import LEN, WORKER_BOOT, ChunkResult, decode_chunk, decode_result, encode_request

log = logging.getLogger(__name__)

WINDOW_PER_WORKER = 4         # tasks in flight per worker


class WorkerProcess:
    """One decoding process and its two pipes, with the bytes not yet sent or parsed."""

    def __init__(self, env: dict[str, str], kwargs: dict[str, Any]) -> None:
        req_r, self.send_fd = os.pipe()
        self.recv_fd, res_w = os.pipe()
        cmd = [sys.executable, "-c", WORKER_BOOT, str(req_r), str(res_w), str(os.getpid())]
        # Started with SIGINT and SIGTERM blocked (the mask is inherited through exec): a
        # Ctrl-C sent to the whole process group never interrupts a worker's start-up.
        try:
            with signals_deferred():
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             pass_fds=(req_r, res_w), env=env)
        except BaseException:
            os.close(self.send_fd)
            os.close(self.recv_fd)
            raise
        finally:
            os.close(req_r)
            os.close(res_w)
        import fcntl  # POSIX: workers are only started there

        for fd in (self.send_fd, self.recv_fd):
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # Linux: fewer, larger reads
        os.set_blocking(self.send_fd, False)
        config = json.dumps(kwargs).encode()
        self.outbox = bytearray(LEN.pack(len(config)) + config)  # the first frame: the decoding options
        self.inbox = bytearray()
        self.ready = False
        self.in_flight = 0

    def has_frame(self) -> bool:
        """Whether a complete frame has been received."""
        return len(self.inbox) >= LEN.size and len(self.inbox) >= LEN.size + LEN.unpack_from(self.inbox)[0]

    def frame(self) -> bytes | None:
        """The next complete frame received, if any."""
        if not self.has_frame():
            return None
        n = LEN.unpack_from(self.inbox)[0]
        data = bytes(self.inbox[LEN.size:LEN.size + n])
        del self.inbox[:LEN.size + n]
        return data

    def end_requests(self) -> None:
        """Close the request pipe (once): the worker ends after the requests it has."""
        if self.send_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.send_fd)
            self.send_fd = -1

    def close(self, kill: bool) -> None:
        """End the process (at once if ``kill``, else at the end of its requests) and reap it."""
        self.end_requests()
        if kill:
            with contextlib.suppress(OSError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=None if kill else 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            with contextlib.suppress(OSError):
                os.close(self.recv_fd)


class Decoder:
    """Decodes chunks of files and yields the results in submission order.

    One worker: in-process. More: this process and ``workers - 1`` worker processes
    (:func:`streamnn.pack.worker.worker_main`, started with ``subprocess``: no fork of this
    process, no multiprocessing machinery, no pickle), each fed at most ``WINDOW_PER_WORKER``
    chunks, so memory stays flat. This process decodes a chunk itself whenever no worker can
    take it (all busy, or none started yet: a start takes ~0.2 s, it imports NumPy and
    OpenCV), after taking in every result that is ready, so the workers never wait for it:
    one worker start-up and one hand-off fewer than ``workers`` processes (measured with
    ``tools/bench_pack.py``: 2 workers on 2 cores spent ~20% more CPU per image than
    decoding in-process, mostly the start-ups). Workers die with this process: on exit they are killed (error or Ctrl-C) or
    stopped after their last request and reaped; if this process is killed, Linux kills
    them (``PR_SET_PDEATHSIG``) and elsewhere their request pipe ends.
    """

    decode_while_booting = True  # this process decodes too; tests turn it off to force every chunk
    #                              through ``workers`` worker processes

    def __init__(self, workers: int, kwargs: dict[str, Any]) -> None:
        self.kwargs, self.workers = kwargs, []
        self._threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # this process decodes too (alone, or while the workers start)
        if workers > 1 and (not sys.executable or os.name != "posix"):
            log.warning("worker processes need a POSIX system and a Python executable; decoding in-process")
            workers = 1
        if workers > 1:
            package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
            try:
                for _ in range(workers - 1 if self.decode_while_booting else workers):
                    self.workers.append(WorkerProcess(env, kwargs))
            except BaseException:
                self._close(failed=True)
                raise

    def _pump(self, until: Callable[[], bool] | None) -> None:
        """Send what is queued and take in what has arrived: one pass that does not block, or
        blocking passes until ``until()`` holds. A worker that dies is an error."""
        while until is None or not until():
            readers = [w for w in self.workers if w.in_flight or not w.ready]
            writers = [w for w in self.workers if w.outbox]
            r, wr, _ = select.select([w.recv_fd for w in readers], [w.send_fd for w in writers], [],
                                     0 if until is None else None)
            for w in writers:
                if w.send_fd in wr:
                    try:
                        del w.outbox[:os.write(w.send_fd, w.outbox)]
                    except BrokenPipeError:
                        raise StreamnnError(self._broken(w)) from None
            for w in readers:
                if w.recv_fd in r:
                    data = os.read(w.recv_fd, 1 << 20)
                    if not data:
                        raise StreamnnError(self._broken(w))
                    w.inbox += data
                    if not w.ready and w.has_frame():
                        if w.frame() != b"ready":
                            raise StreamnnError(self._broken(w))
                        w.ready = True
            if until is None:
                return

    def _broken(self, w: WorkerProcess) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(timeout=5)
        how = f"exit status {w.proc.returncode}" if w.proc.returncode is not None else "it stopped answering"
        return f"a decoding worker process died ({how})"

    def _result(self, head: WorkerProcess | ChunkResult) -> ChunkResult:
        if isinstance(head, tuple):  # decoded here
            return head
        self._pump(until=head.has_frame)
        head.in_flight -= 1
        return decode_result(head.frame() or b"", self.kwargs)

    def map(self, chunks: Iterable[tuple[list[str], list[bool]]]) -> Iterator[ChunkResult]:
        if not self.workers:
            for chunk in chunks:
                yield decode_chunk(*chunk, self.kwargs)
            return
        pending: collections.deque[WorkerProcess | ChunkResult] = collections.deque()  # in submission order
        for chunk in chunks:
            while True:
                self._pump(until=None)
                while pending and (isinstance(pending[0], tuple) or pending[0].has_frame()):
                    yield self._result(pending.popleft())  # what is ready: the workers' windows refill
                free = [w for w in self.workers if w.ready and w.in_flight < WINDOW_PER_WORKER]
                if free:
                    w = min(free, key=lambda w: w.in_flight)
                    payload = encode_request(*chunk)
                    w.outbox += LEN.pack(len(payload)) + payload
                    w.in_flight += 1
                    pending.append(w)
                    break
                if self.decode_while_booting and sum(isinstance(p, tuple) for p in pending) < WINDOW_PER_WORKER:
                    pending.append(decode_chunk(*chunk, self.kwargs))  # no worker can take it: decode here
                    break
                if pending:  # every worker is busy: take the oldest result
                    yield self._result(pending.popleft())
                else:
                    self._pump(until=lambda: any(w.ready for w in self.workers))
            while pending and isinstance(pending[0], tuple):
                yield pending.popleft()
        while pending:
            yield self._result(pending.popleft())

    def _close(self, failed: bool) -> None:
        cv2.setNumThreads(self._threads)
        for w in self.workers:  # first signal every process, then wait: no worker is left behind
            w.end_requests()
            if failed:
                with contextlib.suppress(OSError):
                    w.proc.kill()
        for w in self.workers:
            w.close(kill=failed)
        self.workers = []

    def close(self) -> None:
        """Let the workers finish and reap them (also done on leaving the ``with`` block)."""
        self._close(failed=False)

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._close(failed=exc_type is not None)


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
