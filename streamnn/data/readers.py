"""Read given rows of a store split, normalized to float32, into a caller's buffer.

This is the loader's I/O layer: ``reader.read(rows, out)`` fills ``out`` (b, D) float32 with
the stored rows ``rows`` (any order, repeats allowed) converted to normalized units
(``stored * scale``), whole batches at a time. Four strategies, chosen per dataset when the
reader is opened (lazily, in the process that reads):

``memmap``  (uncompressed contiguous X: the default store layout)
    The dataset's bytes are mapped read-only (``np.memmap`` at ``dset.id.get_offset()``) and
    a batch is one ``np.take(map, rows, axis=0, out=...)`` gather; float16 / uint8 rows are
    gathered into a small staging buffer and scaled into ``out`` in one pass. No HDF5 call
    at all after opening (the h5py file is closed once the map exists), so nothing holds
    h5py's global lock and the gather releases the GIL: a prefetch thread overlaps it with
    the caller's BLAS work. Mapped file pages belong to the OS page cache (RssFile, shared,
    reclaimable), not to the process's private memory. The map is checked against h5py on
    the first and last row when opened.
``pread``   (the same layout, when the store does not fit in the page cache)
    Positional reads straight from the file, no mapping at all: the batch's rows are sorted,
    runs of consecutive stored rows become one ``os.preadv`` each (scattering into the rows'
    places in the batch, split at ``MAX_RUN_BYTES``), and the requests are spread over a pool
    of ``PREAD_THREADS`` threads (``preadv`` releases the GIL, so they are all in flight at
    once: a disk or SSD only reaches its rate with many requests queued). The caller
    announces the coming batches (``expect(key, rows)``, along the epoch order, which is
    known in advance) and the pool reads them ahead into staging buffers, up to
    ``AHEAD_BYTES`` of rows. Announced batches go to the pool in groups of a third of that,
    sorted together, so runs of adjacent rows cross batch boundaries (block order: 5.3 rows a
    read instead of 2.2 for 64x64x3 float32 rows, batches of 256). ``read(rows, out, key)``
    then waits for that batch and converts it into ``out`` in one pass, or lends its staging
    buffer (float32: no copy); an unannounced batch is read at once, the same way. The fd
    is advised ``POSIX_FADV_RANDOM``: no readahead, so the bytes read are the rows asked for
    (through a memory map each random row drags readahead with it: 55-68x the bytes
    delivered, exact shuffle of a 31.6 GB store, ``tools/bench_bigstore.py``; this reader:
    1.04x, at the disk's own 16-thread random-row rate), and the process's memory is its buffers:
    nothing of the store is mapped, so RSS does not grow with the pages touched. The pool
    is created on the first read in the reading process and joined by :meth:`close`.
``hdf5``    (contiguous but not mappable: non-native byte order, a non-default driver)
    Sorted unique rows read with one h5py call per batch (a point-union selection), then
    put back in batch order.
``chunks``  (chunked datasets, compressed or not)
    Rows are grouped by chunk band (``chunks[0]`` rows); each needed band is read whole with
    one h5py call (decompressed once) into a small LRU of bands, and rows are copied out of
    it. With the loader's ``order="block"`` (blocks = chunk bands) every band is read once
    per epoch; with the exact random order a batch touches ~one band per row, which is
    correct but slow for compressed stores (decompress a whole chunk per row).

Choice between ``memmap`` and ``pread`` (``reader="auto"``): ``pread`` when the split's X is
larger than ``FIT_FRACTION`` (1/2) of the memory available to the page cache (``MemAvailable``
of ``/proc/meminfo``, capped by the cgroup's ``memory.max``), ``memmap`` otherwise. The cost
of a wrong guess is asymmetric: a map over a store that does not stay cached reads ~60x the
bytes it delivers (40x slower measured), while ``pread`` over a cached store stays a copy from
the cache (0.55-0.85x the map's speed measured), hence the margin.
``reader="mmap"`` / ``"pread"`` force one (chunked stores are always read by chunks).

Readers are not thread-safe; the loader uses each one from a single thread. They hold no
state that matters across ``fork``: the loader drops its reader in a child and opens another
(the pread pool is created lazily in the reading process; a fork does not copy its threads).
"""
from __future__ import annotations

import bisect
import concurrent.futures
import os
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from pathlib import Path

import h5py
import numpy as np

from streamnn.errors import StreamnnError
from streamnn.data.format import FORMAT, STORE_DTYPES

#: Row bands (chunks) kept decompressed by the ``chunks`` strategy, at least.
MIN_CACHED_BANDS = 4
#: Reader choices of :func:`open_rows` (and ``Loader(reader=...)``).
READERS = ("auto", "mmap", "pread")
#: ``reader="auto"`` reads with ``pread`` when X is larger than this fraction of the memory available.
FIT_FRACTION = 0.5
#: Threads of the ``pread`` strategy (requests in flight).
PREAD_THREADS = 16
#: The ``pread`` strategy reads ahead of the batch being used up to this many bytes of stored
#: rows, or ``AHEAD_ROWS`` rows if fewer (enough requests to keep every thread busy).
AHEAD_BYTES = 96 << 20
AHEAD_ROWS = 2048
#: ... and at most this many batches (small batches: announcing costs per batch).
AHEAD_BATCHES = 64
#: Longest single ``preadv`` (a longer run of consecutive rows is split, and read in parallel).
MAX_RUN_BYTES = 1 << 20
#: Rows per pool task (fewer tasks: less Python overhead; enough of them: every thread busy).
TASK_BYTES = 256 << 10


class RowReader:
    """Base class: ``read(rows, out)`` fills ``out[i]`` with normalized row ``rows[i]``."""

    mode = "?"
    #: True when :meth:`read` runs without the GIL and without h5py's lock (safe and useful
    #: to run in a prefetch thread).
    releases_gil = False

    def __init__(self, n_rows: int, n_features: int, dtype: np.dtype, scale: float) -> None:
        self.n_rows, self.n_features = n_rows, n_features
        self.dtype = np.dtype(dtype)
        self.row_bytes = n_features * self.dtype.itemsize  # of a stored row
        self.scale = float(scale)
        self._scale32 = np.float32(scale)
        self._direct = self.dtype == np.float32 and self.scale == 1.0  # stored == normalized
        self._stage: np.ndarray | None = None  # stored-dtype scratch, grown on demand

    def _staging(self, n: int, dtype: np.dtype | None = None) -> np.ndarray:
        dtype = np.dtype(dtype or self.dtype)
        if self._stage is None or self._stage.shape[0] < n or self._stage.dtype != dtype:
            self._stage = np.empty((max(n, 1), self.n_features), dtype)
        return self._stage[:n]

    def _convert(self, raw: np.ndarray, out: np.ndarray) -> None:
        """Stored rows to normalized float32, one pass (same values as ``Store.normalize``)."""
        if self.scale == 1.0:
            np.copyto(out, raw, casting="unsafe")
        else:
            np.multiply(raw, self._scale32, out=out, casting="unsafe")

    def read(self, rows: np.ndarray, out: np.ndarray, key: Hashable = None) -> np.ndarray:
        """Fill ``out`` with the rows and return it, or return an array of the same shape and
        values that the reader owns (valid until ``lend`` more reads; only ``pread`` does that).
        ``key``: the batch's identity as announced to :meth:`expect`."""
        raise NotImplementedError

    #: True when the reader wants to hear of coming batches (:meth:`expect`).
    reads_ahead = False
    #: Rows the reader may hold ahead (the caller announces about this many).
    ahead_rows = 0

    def ahead_batches(self, batch_size: int) -> int:
        """How many coming batches of ``batch_size`` rows the caller should announce."""
        return min(AHEAD_BATCHES, -(-self.ahead_rows // batch_size)) if self.reads_ahead else 0
    #: Reads after which an array returned by :meth:`read` may be reused (see ``read``).
    lend = 0

    def expect(self, key: Hashable, rows: np.ndarray) -> None:
        """Announce that ``read(rows, ..., key=key)`` comes soon (ignored by most readers)."""

    def forget(self) -> None:
        """Drop what was announced (the caller's stream jumped elsewhere)."""

    def close(self) -> None:
        self._stage = None


class MemmapReader(RowReader):
    mode = "memmap"
    releases_gil = True

    def __init__(self, path: str, offset: int, n_rows: int, n_features: int, dtype: np.dtype,
                 scale: float) -> None:
        super().__init__(n_rows, n_features, dtype, scale)
        # A plain ndarray view of the map (np.memmap's subclass machinery is not needed).
        self._map = np.memmap(path, dtype=self.dtype, mode="r", offset=offset,
                              shape=(n_rows, n_features)).view(np.ndarray)

    def read(self, rows: np.ndarray, out: np.ndarray, key: Hashable = None) -> np.ndarray:
        if self._direct:
            np.take(self._map, rows, axis=0, out=out)
        else:
            stage = self._staging(len(rows))
            np.take(self._map, rows, axis=0, out=stage)
            self._convert(stage, out)
        return out

    def row(self, i: int) -> np.ndarray:
        return self._map[i]

    @property
    def array(self) -> np.ndarray:
        """The mapped rows (N, D), read-only."""
        return self._map

    def close(self) -> None:
        super().close()
        self._map = None  # type: ignore[assignment]  # unmapped when the last view goes


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
                 segments: Sequence[tuple[str, int, int]] | None = None) -> None:
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
            for seg_path, seg_offset, rows in segments:
                self._fds.append(os.open(seg_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self._fds[-1], seg_offset, rows * self.row_bytes, os.POSIX_FADV_RANDOM)
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


class _H5Reader(RowReader):
    def __init__(self, file: h5py.File, dset: h5py.Dataset, dtype: np.dtype, scale: float) -> None:
        super().__init__(int(dset.shape[0]), int(dset.shape[1]), dtype, scale)
        self._file, self._dset = file, dset

    def close(self) -> None:
        super().close()
        if self._file is not None and self._file.id.valid:
            self._file.close()
        self._file = self._dset = None  # type: ignore[assignment]

    def _finish(self, stage: np.ndarray, inverse: np.ndarray, out: np.ndarray) -> None:
        """Unique rows ``stage`` (stored dtype, sorted) -> ``out`` in batch order, normalized."""
        if self._direct:
            np.take(stage, inverse, axis=0, out=out)
            return
        if self._fscratch is None or self._fscratch.shape[0] < len(stage):
            self._fscratch = np.empty((max(len(stage), 1), self.n_features), np.float32)
        normalized = self._fscratch[:len(stage)]
        self._convert(stage, normalized)
        np.take(normalized, inverse, axis=0, out=out)

    _fscratch: np.ndarray | None = None


class Hdf5Reader(_H5Reader):
    """Contiguous but not mappable: one point-union h5py read per batch."""

    mode = "hdf5"

    def read(self, rows: np.ndarray, out: np.ndarray, key: Hashable = None) -> np.ndarray:
        uniq, inverse = np.unique(rows, return_inverse=True)
        stage = self._staging(len(uniq))
        if len(uniq):
            self._dset.read_direct(stage, source_sel=np.s_[uniq], dest_sel=np.s_[0:len(uniq)])
        self._finish(stage, inverse, out)
        return out


class ChunkReader(_H5Reader):
    """Chunked (maybe compressed): whole chunk bands, one h5py call each, in a small LRU."""

    mode = "chunks"

    def __init__(self, file: h5py.File, dset: h5py.Dataset, dtype: np.dtype, scale: float,
                 cached_bands: int) -> None:
        super().__init__(file, dset, dtype, scale)
        self.band_rows = int(dset.chunks[0])
        self.capacity = max(MIN_CACHED_BANDS, int(cached_bands))
        self._bands: OrderedDict[int, np.ndarray] = OrderedDict()
        self.bands_read = 0  # decompressions done (for tests and benchmarks)

    def _band(self, b: int) -> np.ndarray:
        band = self._bands.get(b)
        if band is not None:
            self._bands.move_to_end(b)
            return band
        if len(self._bands) >= self.capacity:
            _, band = self._bands.popitem(last=False)  # reuse the evicted band's memory
        start = b * self.band_rows
        stop = min(self.n_rows, start + self.band_rows)
        if band is None or band.shape[0] != self.band_rows:
            band = np.empty((self.band_rows, self.n_features), self.dtype)
        self._dset.read_direct(band, source_sel=np.s_[start:stop], dest_sel=np.s_[0:stop - start])
        self.bands_read += 1
        self._bands[b] = band
        return band

    def read(self, rows: np.ndarray, out: np.ndarray, key: Hashable = None) -> np.ndarray:
        uniq, inverse = np.unique(rows, return_inverse=True)
        stage = self._staging(len(uniq))
        band_of = uniq // self.band_rows
        edges = np.flatnonzero(np.diff(band_of)) + 1
        groups = list(zip(np.r_[0, edges].tolist(), np.r_[edges, len(uniq)].tolist()))
        # Cached bands first: the bands read next then evict bands this batch no longer needs
        # (a batch that straddles two block windows would otherwise evict and re-read some).
        groups.sort(key=lambda g: int(band_of[g[0]]) not in self._bands)
        for lo, hi in groups:
            b = int(band_of[lo])
            np.take(self._band(b), uniq[lo:hi] - b * self.band_rows, axis=0, out=stage[lo:hi])
        self._finish(stage, inverse, out)
        return out

    def close(self) -> None:
        self._bands.clear()
        super().close()


def open_rows(path: str | os.PathLike, split: str, *, fingerprint: str | None = None,
              cached_bands: int = MIN_CACHED_BANDS, allow_memmap: bool = True, reader: str = "auto",
              threads: int | None = None) -> RowReader:
    """Open the row reader for ``split`` of the store at ``path`` (the best strategy it allows).

    ``fingerprint``: the content identity the caller validated earlier; a store replaced since
    then is a one-line error, not silently different data. ``reader``: "auto" (see the module
    docstring), "mmap" or "pread" for the default (contiguous) layout.
    """
    if reader not in READERS:
        raise StreamnnError(f"unknown reader {reader!r} (choose {', '.join(READERS)})")
    path = os.fspath(Path(path))
    try:
        f = h5py.File(path, "r", rdcc_nbytes=0)
    except OSError as exc:
        raise StreamnnError(f"cannot open the store ({exc.__class__.__name__}: {exc})", path) from None
    try:
        attrs = f.attrs
        fmt = attrs.get("format")
        fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
        if fmt != FORMAT:
            raise StreamnnError("not a streamnn store (no 'format = streamnn-store' attribute)", path)
        fp = attrs.get("fingerprint")
        fp = fp.decode() if isinstance(fp, bytes) else str(fp)
        if fingerprint is not None and fp != fingerprint:
            raise StreamnnError(f"the store changed since the loader was made (content fingerprint "
                                f"{fp[:12]}..., expected {fingerprint[:12]}...)", path)
        if split not in f or "X" not in f[split]:
            raise StreamnnError(f"unknown split {split!r}", path)
        dset = f[split]["X"]
        if dset.is_virtual:  # a sharded store's index: read the shards themselves
            from streamnn.data.shards import open_segments

            try:
                return open_segments(f, Path(path), split, reader=reader, cached_bands=cached_bands,
                                     allow_memmap=allow_memmap, threads=threads)
            finally:
                f.close()
        stored = str(attrs["dtype"].decode() if isinstance(attrs["dtype"], bytes) else attrs["dtype"])
        dtype = np.dtype(STORE_DTYPES[stored])
        scale = float(attrs["scale"])
        n, d = (int(s) for s in dset.shape)
        if dset.chunks is not None:
            return ChunkReader(f, dset, dtype, scale, cached_bands)
        offset = dset.id.get_offset()
        nbytes = n * d * dtype.itemsize
        plain = (allow_memmap and n > 0 and offset is not None and dset.dtype == dtype
                 and dset.dtype.isnative and f.driver == "sec2" and f.userblock_size == 0
                 and offset + nbytes <= os.path.getsize(path))
        if plain:
            pread = reader == "pread" or (reader == "auto" and not fits_in_memory(nbytes))
            raw: RowReader = (PreadReader(path, int(offset), n, d, dtype, scale, threads or PREAD_THREADS) if pread
                              else MemmapReader(path, int(offset), n, d, dtype, scale))
            if _same_row(raw, dset, 0) and _same_row(raw, dset, n - 1):
                f.close()
                return raw
            raw.close()
        return Hdf5Reader(f, dset, dtype, scale)
    except BaseException:
        if f.id.valid:
            f.close()
        raise


def available_memory() -> int | None:
    """Bytes the page cache may use: ``MemAvailable``, capped by the cgroup (v2) ``memory.max``."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:
        with open("/proc/self/cgroup") as f:
            group = next(line.strip()[3:] for line in f if line.startswith("0::"))
        with open(f"/sys/fs/cgroup{group}/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            avail = min(avail, int(limit))
    except (OSError, StopIteration):
        pass
    return avail


def fits_in_memory(nbytes: int) -> bool:
    """Whether ``nbytes`` of store stay cached: at most ``FIT_FRACTION`` of the memory available
    (unknown memory, e.g. not Linux: assume it fits, the map is then the reader)."""
    avail = available_memory()
    return avail is None or nbytes <= FIT_FRACTION * avail


def _same_row(reader: MemmapReader | PreadReader, dset: h5py.Dataset, i: int) -> bool:
    return bool(np.array_equal(reader.row(i), dset[i], equal_nan=reader.dtype.kind == "f"))
