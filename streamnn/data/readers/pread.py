"""``pread``: positional reads from a pool of threads, nothing mapped (the default layout, when
the store does not fit in the page cache).

The batch's rows are sorted, runs of consecutive stored rows become one ``os.preadv`` each
(scattering into the rows' places in the batch, split at ``MAX_RUN_BYTES``), and the requests
are spread over a pool of ``PREAD_THREADS`` threads (``preadv`` releases the GIL, so they are
all in flight at once: a disk or SSD only reaches its rate with many requests queued). The
caller announces the coming batches (``expect(key, rows)``, along the epoch order, which is
known in advance) and the pool reads them ahead into staging buffers, up to ``AHEAD_BYTES`` of
rows. Announced batches go to the pool in groups of a third of that, sorted together, so runs
of adjacent rows cross batch boundaries (block order: 5.3 rows a read instead of 2.2 for
64x64x3 float32 rows, batches of 256). ``read(rows, out, key)`` then waits for that batch and
converts it into ``out`` in one pass, or lends its staging buffer (float32: no copy); an
unannounced batch is read at once, the same way. The fd is advised ``POSIX_FADV_RANDOM``: no
readahead, so the bytes read are the rows asked for (through a memory map each random row
drags readahead with it: 55-68x the bytes delivered, exact shuffle of a 31.6 GB store,
``tools/bench_bigstore.py``; this reader: 1.04x, at the disk's own 16-thread random-row rate).
The advice does not stop readahead that a read starts on a page marked by an earlier readahead
(the kernel's asynchronous readahead only checks the file's window size), and h5py's reads when
the file is opened (the superblock, row 0) leave such marks in the first pages of X; so the
first ``HEAD_BYTES`` of X are dropped from the page cache when the reader opens (without that, a
cold epoch of a 25,000-row uint8 store read up to 1.5x the bytes asked for, seen with
``tools/bench_cold.py --bytes`` and the reader's own read-ahead turned off). The process's memory
is its buffers: nothing of the store is mapped, so RSS does not grow
with the pages touched. The pool is created on the first read in the reading process and
joined by :meth:`PreadReader.close`.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import os
from collections import deque
from collections.abc import Hashable, Sequence

import numpy as np

from streamnn.data.readers.base import FileWatch, RowReader
from streamnn.errors import StreamnnError

#: Threads of the ``pread`` strategy (requests in flight).
PREAD_THREADS = 16
#: The ``pread`` strategy reads ahead of the batch being used up to this many bytes of stored
#: rows, or ``AHEAD_ROWS`` rows if fewer (enough requests to keep every thread busy; at most
#: ``base.AHEAD_BATCHES`` batches).
AHEAD_BYTES = 96 << 20
AHEAD_ROWS = 2048
#: Longest single ``preadv`` (a longer run of consecutive rows is split, and read in parallel).
MAX_RUN_BYTES = 1 << 20
#: Rows per pool task (fewer tasks: less Python overhead; enough of them: every thread busy).
TASK_BYTES = 256 << 10
#: The head of X dropped from the page cache on opening (see :class:`PreadReader`).
HEAD_BYTES = 8 << 20


class _Reads:
    """The pool tasks of one submission (shared by the batches read together)."""

    __slots__ = ("tasks", "done")

    def __init__(self, tasks: list[concurrent.futures.Future]) -> None:
        self.tasks, self.done = tasks, False


class _Batch:
    """A batch announced ahead: its rows, the staging buffer they land in, its reads (None: not
    sent to the pool yet)."""

    __slots__ = ("key", "rows", "stage", "reads")

    def __init__(self, key: Hashable, rows: np.ndarray, stage: np.ndarray) -> None:
        self.key, self.rows, self.stage = key, rows, stage
        self.reads: _Reads | None = None


class PreadReader(RowReader):
    """Positional reads into the batch's buffers from a pool of threads; nothing mapped.

    The rows may lie in several files (``segments``: (path, offset, rows) one after the
    other, a sharded store's split): a run of consecutive rows never crosses a segment, and
    each run is one ``preadv`` into the batch's rows, whichever file it reads.
    """

    mode = "pread"
    releases_gil = True
    reads_ahead = True

    def __init__(self, path: str, offset: int, n_rows: int, n_features: int, dtype: np.dtype,
                 scale: float, threads: int = PREAD_THREADS,
                 segments: Sequence[tuple[str, int, int]] | None = None,
                 expect: Sequence[tuple[int, int, int, int] | None] | None = None) -> None:
        segments = [(path, int(offset), n_rows)] if segments is None else list(segments)
        super().__init__(sum(rows for _, _, rows in segments), n_features, dtype, scale)
        self.path, self.threads = path, max(1, int(threads))
        self.ahead_rows = max(1, min(AHEAD_ROWS, AHEAD_BYTES // self.row_bytes))
        #: Announced batches are sent to the pool together once they hold this many rows, so
        #: that runs of adjacent rows cross batch boundaries (block order: whole blocks).
        self.group_rows = max(1, self.ahead_rows // 3)
        self._run_rows = max(1, MAX_RUN_BYTES // self.row_bytes)
        self._task_rows = max(1, TASK_BYTES // self.row_bytes)
        self.offsets = [int(off) for _, off, _ in segments]  # of each segment's rows in its file
        self._starts = np.cumsum([0] + [rows for _, _, rows in segments]).tolist()
        self._fds: list[int] = []
        try:
            for i, (seg_path, seg_offset, rows) in enumerate(segments):
                self._fds.append(os.open(seg_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
                self.watches.append(FileWatch(seg_path, self._fds[-1], seg_offset + rows * self.row_bytes,
                                              expect[i] if expect is not None else None))
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self._fds[-1], seg_offset, rows * self.row_bytes, os.POSIX_FADV_RANDOM)
                    # Readahead marks left in X by h5py's reads (opening the file, checking row 0)
                    # would start readahead on our reads too: drop the pages they can be on.
                    os.posix_fadvise(self._fds[-1], seg_offset, min(rows * self.row_bytes, HEAD_BYTES),
                                     os.POSIX_FADV_DONTNEED)
        except BaseException:
            for fd in self._fds:
                os.close(fd)
            raise
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._ahead: deque[_Batch] = deque()
        self._ahead_keys: set[Hashable] = set()
        self._unsent: list[_Batch] = []
        self._spare: list[np.ndarray] = []  # staging buffers of finished batches, for reuse
        #: float32 batches are returned in their staging buffer, which stays untouched until
        #: ``lend`` later batches have been read (the caller's batches in use and prefetched).
        self.lend = 3
        self._lent: deque[np.ndarray] = deque()
        self.calls = 0  # preadv calls made (coalescing is visible here)

    # -- the reads -------------------------------------------------------------------------------
    def _runs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(first, count, where)``: run j reads ``count[j]`` stored rows from ``first[j]`` into
        places ``where[s[j]:s[j] + count[j]]`` (s the running sum of count). A row asked for
        twice is read twice: first occurrences in one sorted pass, then second ones, and so on."""
        where = np.argsort(rows, kind="stable")
        srt = rows[where]
        m = len(srt)
        idx = np.arange(m)
        new = np.ones(m, bool)
        new[1:] = srt[1:] != srt[:-1]
        repeat = idx - np.maximum.accumulate(np.where(new, idx, 0))  # occurrences before this one
        if repeat.any():
            again = np.lexsort((srt, repeat))
            where, srt = where[again], srt[again]
        new[0], new[1:] = True, np.diff(srt) != 1
        if len(self._fds) > 1:  # a run stays within one segment (file)
            seg = np.searchsorted(self._starts, srt, side="right")
            new[1:] |= seg[1:] != seg[:-1]
        run_start = np.maximum.accumulate(np.where(new, idx, 0))
        new |= (idx - run_start) % self._run_rows == 0  # split long runs
        starts = np.flatnonzero(new)
        return srt[starts], np.diff(np.r_[starts, m]), where

    def _submit(self, rows: np.ndarray, dest: list[np.ndarray] | np.ndarray) -> _Reads:
        """Start reading stored ``rows[i]`` into ``dest[i]`` (one row, stored dtype) on the pool."""
        if self._pool is None or self._pid != os.getpid():
            # Created here, in the reading process, on first use (a pool is never inherited).
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="streamnn-pread")
            self._pid = os.getpid()
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise StreamnnError(f"rows outside 0..{self.n_rows - 1}", self.path)
        if not len(rows):
            return _Reads([])
        first, count, where = self._runs(np.asarray(rows, np.int64))
        # A task: the consecutive runs that end in the same TASK_BYTES of the batch's rows.
        ends = np.cumsum(count)
        cut = np.flatnonzero(np.diff((ends - 1) // self._task_rows)) + 1
        run_lo, run_hi = np.r_[0, cut].tolist(), np.r_[cut, len(first)].tolist()
        row_lo, row_hi = np.r_[0, ends[cut - 1]].tolist(), ends[np.r_[cut, len(first)] - 1].tolist()
        first_, count_, where_ = first.tolist(), count.tolist(), where.tolist()
        return _Reads([self._pool.submit(self._read_runs, first_[a:b], count_[a:b], where_[c:d], dest)
                       for a, b, c, d in zip(run_lo, run_hi, row_lo, row_hi)])

    def _send(self) -> None:
        """Submit the announced batches not sent yet, as one set of runs."""
        group, self._unsent = self._unsent, []
        if group:
            rows = np.concatenate([b.rows for b in group]) if len(group) > 1 else group[0].rows
            reads = self._submit(rows, [row for b in group for row in b.stage])
            for b in group:
                b.reads = reads

    def _read_runs(self, first: list[int], count: list[int], where: list[int],
                   dest: list[np.ndarray] | np.ndarray) -> int:
        """In a pool thread: one ``preadv`` per run, straight into the rows of ``dest``."""
        i, starts = 0, self._starts
        for r, c in zip(first, count):
            bufs = [dest[w] for w in where[i:i + c]]
            i += c
            s = bisect.bisect_right(starts, r) - 1
            fd, offset, size = self._fds[s], self.offsets[s] + (r - starts[s]) * self.row_bytes, c * self.row_bytes
            got = os.preadv(fd, bufs, offset)
            if got != size:
                self._finish_short(fd, bufs, offset, got)
        return len(first)

    def _finish_short(self, fd: int, bufs: list[np.ndarray], offset: int, got: int) -> None:
        """A short read (a signal, or a file cut short): read the rest buffer by buffer."""
        for buf in bufs:
            view = memoryview(buf).cast("B")
            have = min(max(got, 0), len(view))
            while have < len(view):
                n = os.preadv(fd, [view[have:]], offset + have)
                if n == 0:
                    raise StreamnnError("the store ended before its rows (truncated?)", self.path)
                have += n
            got -= len(view)
            offset += len(view)

    def _wait(self, reads: _Reads) -> None:
        if reads.done:
            return
        try:
            calls = sum(t.result() for t in reads.tasks)
        except BaseException:  # an I/O error: no task may write into the buffer once we return
            for t in reads.tasks:
                t.cancel()
            concurrent.futures.wait(reads.tasks)
            raise
        self.calls += calls
        reads.done = True

    def _drop(self, batch: _Batch, cancel: bool = False) -> None:
        """Forget ``batch`` (its reads may serve others: ``cancel`` only when all are dropped)."""
        self._ahead_keys.discard(batch.key)
        if batch.reads is None:
            self._unsent.remove(batch)
        else:
            if cancel:
                for t in batch.reads.tasks:
                    t.cancel()
            concurrent.futures.wait(batch.reads.tasks)  # no task writes into a reused buffer
        self._release(batch.stage)

    def _release(self, stage: np.ndarray) -> None:
        self._spare.append(stage if stage.base is None else stage.base)  # whole, for any batch size

    def _stage_for(self, n: int) -> np.ndarray:
        for i, buf in enumerate(self._spare):
            if buf.shape[0] >= n:
                return self._spare.pop(i)[:n]
        return np.empty((n, self.n_features), self.dtype)

    # -- the interface ---------------------------------------------------------------------------
    def expect(self, key: Hashable, rows: np.ndarray) -> None:
        if key in self._ahead_keys:
            return
        batch = _Batch(key, rows, self._stage_for(len(rows)))
        self._ahead.append(batch)
        self._ahead_keys.add(key)
        self._unsent.append(batch)
        if sum(len(b.rows) for b in self._unsent) >= self.group_rows:
            self._send()

    def read(self, rows: np.ndarray, out: np.ndarray, key: Hashable = None) -> np.ndarray:
        try:
            got = self._read(rows, out, key)
        except (StreamnnError, OSError):
            self.check()  # a short or failed read of a file that changed: say that
            raise
        self.check()  # the rows were read from the files as they were opened (size, mtime, path)
        return got

    def _read(self, rows: np.ndarray, out: np.ndarray, key: Hashable) -> np.ndarray:
        if key is not None and key in self._ahead_keys:
            batch = self._ahead.popleft()
            while batch.key != key:  # announced before this one: not wanted any more
                self._drop(batch)
                batch = self._ahead.popleft()
            if np.array_equal(batch.rows, rows):
                if batch.reads is None:
                    self._send()
                try:
                    self._wait(batch.reads)  # type: ignore[arg-type]
                    if self._direct:  # the staging buffer is the batch: lend it, no copy
                        self._ahead_keys.discard(batch.key)
                        self._lent.append(batch.stage)
                        while len(self._lent) > self.lend:
                            self._release(self._lent.popleft())
                        return batch.stage
                    self._convert(batch.stage, out)
                except BaseException:
                    self._drop(batch)
                    raise
                self._drop(batch)
                return out
            self._drop(batch)
        dest = out if self._direct else self._staging(len(rows))
        self._wait(self._submit(rows, dest))
        if not self._direct:
            self._convert(dest, out)
        return out

    def forget(self) -> None:
        while self._ahead:
            self._drop(self._ahead.popleft(), cancel=True)

    def row(self, i: int) -> np.ndarray:
        """Stored row ``i``, read in the calling thread (not counted in :attr:`calls`)."""
        buf = np.empty((1, self.n_features), self.dtype)
        self._read_runs([i], [1], [0], buf)
        return buf[0]

    def close(self) -> None:
        """Cancel the reads ahead, join the pool's threads, close the file."""
        if self._pid == os.getpid():
            while self._ahead:
                self._drop(self._ahead.popleft(), cancel=True)
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        self._ahead.clear()
        self._ahead_keys.clear()
        self._unsent.clear()
        self._pool = None
        self._spare = []
        self._lent.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        super().close()

