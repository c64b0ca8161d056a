"""Shuffled, resumable, shardable mini-batches streamed from a store split.

Usage::

    with Loader("cats.h5", "train", batch_size=64, seed=7) as loader:
        for epoch in range(10):
            for X, Y in loader:          # one epoch from the current position
                ...                       # X (D, B) float32, Y (1, B) / (K, B)
        state = loader.state_dict()      # str/int dict: resume later, O(1)

Design
======
Order. An epoch's order is a pure function of ``(seed, epoch)`` (and the store's row count),
computed from nothing else: ``np.random.Generator(np.random.PCG64([seed, epoch]))``. So the
same seed gives the same batches on any machine (with the same NumPy), with any prefetch
depth, and a resumed run continues exactly where it stopped.

* ``shuffle=False``: stored order (or the ``subset`` in the order given).
* ``order="exact"`` (default): ``rng.permutation(n)``, a uniform random permutation.
* ``order="block"``: FFCV-like quasi-random order. Rows are grouped in blocks of
  ``block_rows`` consecutive stored rows (default: the dataset's chunk rows, or ~1 MiB of
  rows for contiguous data, which equals what :class:`~streamnn.data.writer.StoreWriter` uses as
  chunk rows); the blocks are permuted, taken ``window_blocks`` (default 16) at a time, and
  the rows of each such window are permuted together. Every row still comes exactly once
  per epoch, but a batch holds rows of at most ``window_blocks`` blocks (twice that where
  it straddles two windows). Trade-off: stores are packed class by class, so a block is
  usually one class; a batch's class mix then varies like a sample of ~``window_blocks``
  blocks instead of B rows (two balanced classes, B = 64: the fraction of one class in a
  batch has a standard deviation of about 0.5/sqrt(16) = 0.13 instead of 0.5/sqrt(64) =
  0.06), and rows close in storage arrive close in time, every epoch. Use it when reads
  are the bottleneck: compressed / chunked stores (each chunk is decompressed once per
  epoch instead of about once per row: measured 6x faster on lzf) or a cold page cache on
  a slow disk. For the default uncompressed store in the page cache the exact order is as
  fast (both are a gather from the memory map), so it stays the default.

Sharding (:mod:`streamnn.data.order`). ``batch_size`` B is the *global* batch: batch k of an
epoch is positions ``[k*B, (k+1)*B)`` of the epoch order (the last one partial unless
``drop_last``) for any ``world_size`` W, and rank r yields its interleaved share of it, every
W-th row ``batch[r::W]``. The ranks' rows of batch k are exactly the one-process batch k;
every rank has the same number of batches; no row is padded or repeated (a share may be one
row shorter than another's, or empty when the batch has fewer than W rows).

Batches. X is ``(D, b)`` float32 normalized to [0, 1] (``stored * scale``), then augmented
and standardized by :mod:`streamnn.data.transforms` (the functions inference uses too):
``augment="flip"`` mirrors each image left-right with probability 1/2, ``"shift"`` translates
it by up to ``shift`` pixels (``shift_padding`` "reflect" or "zero"), ``"flip,shift"`` does
both; the draws are pure functions of (seed, epoch, global batch, row in it), each rank keeping
its rows' draws of the whole global batch, so resumed runs and any number of ranks see the
same images; ``standardize=True`` computes ``(x - mean) * (1 / std)`` with the store's
``/stats`` (float32 copies made once, features with std <= 1e-8 only centred). Y: two classes
-> ``(1, b)`` float32 0/1;
K > 2 -> ``(1, b)`` int64 labels; ``one_hot=True`` -> ``(K, b)`` float32.

X layout. Rows are gathered into a C-ordered ``(b, D)`` buffer and X is its transpose view
``buf[:b].T``: (D, b), F-contiguous, zero copy. BLAS takes either layout: measured for
(64, 12288) weights and B = 64 on one core, ``W @ X`` 1.58 ms (F) vs 1.60 ms (C), and the
backward ``dZ @ X.T`` 1.62 ms (F: X.T is C-contiguous) vs 2.49 ms (C), while making X
C-contiguous would cost a 2.6 ms transpose copy, ~5x the gather of the batch itself.
Elementwise work is layout-blind, and ``X.T.reshape(b, H, W, C)`` is free.

Buffer lifetime. X buffers are reused from a ring of ``prefetch + 2``: a batch's X stays
intact while the next batch is used, and is overwritten no earlier than when the batch
two after it is requested (the current and the previous batch are always valid). Copy X to
keep it longer. Y is a fresh array every batch. (A fresh 3 MB X per batch made the gather
loop ~4x slower: page faults on every new buffer.)

I/O (:mod:`streamnn.data.readers`). Whole batches, never an h5py call per row. The default
store layout (uncompressed, contiguous X) is read one of two ways (``reader``: "auto",
"mmap", "pread"; ``reader_mode`` says which was chosen). A store that fits in the page cache
is memory-mapped: a batch is one ``np.take`` gather from the map into the X buffer (uint8 /
float16 via a staging buffer, scaled in one pass). Mapped pages are OS page cache, not
private memory, so private memory is bounded by the buffers: ``(prefetch + 2)`` X buffers +
one staging batch (+ augmentation scratch), plus index memory that does grow with N but is
tiny next to the rows: 4 bytes per row of the split for labels and 8 per row for each cached
epoch order (at most 3). A store bigger than that ("auto": X over half the available memory)
is read with positional reads from a pool of threads, nothing mapped: before producing batch
k the loader announces the next batches of the order (about ``rowreader.AHEAD_ROWS`` rows,
at most ``AHEAD_BYTES``) to the reader, which reads them ahead; float32 batches are then
handed over in the reader's buffer (no copy; it stays untouched for ``prefetch + 2`` more
batches, as the X ring). The reads ahead are pure work-ahead: a batch is still a function
of (epoch, index) alone, the same bit for bit whatever the reader.
Chunked/compressed stores read whole chunks, one h5py call each, into an LRU of
``window_blocks + 2`` decompressed chunks.

Prefetch. With the memory map or pread and ``prefetch`` > 0, one background thread can produce the
next ``prefetch`` batches (crossing into the next epoch) while the caller trains: the gather
releases the GIL and never touches h5py, so it overlaps with the caller's BLAS calls. The
thread is used only while it pays: the loader keeps running means of the caller's time
between batches and of the time to produce one, and prefetches in the thread while the
caller's time exceeds the production time (switching back below half of it); otherwise it
produces each batch in the caller's thread. Measured on the 2-core machine: a bare loop
over batches ran at 0.5-0.7x the in-memory gather through the thread (every batch a
cross-thread hand-off; on a busy machine the second thread waits for a core) but at
0.75-1.0x inline, while a matmul "training" epoch (tanh(W @ X), W (64, 12288)) took
0.84-0.87x the in-memory time with the thread (the gather overlaps the matmul) and
1.03-1.18x without, on a quiet machine (tools/bench_loader.py; under a load average of
2.5-6 the same run gave 0.77-1.15x and 0.80-1.67x). ``loader.prefetch_policy`` ("auto", "thread", "inline") overrides the
choice. The h5py readers are always used synchronously in the caller's thread (h5py
serializes every call under one global lock and decompresses with the GIL held). Batches
are the same with any prefetch depth or policy: each is a pure function of (epoch, index).

Position and state. ``position`` counts (global) batches handed to the caller in the current
epoch; the state also records it as ``samples``, the samples consumed by all ranks together.
Breaking out of a ``for`` keeps it; the next ``for`` resumes there. Finishing an epoch
(the ``for`` ends) increments ``epoch`` and resets ``position``; a position at the end of
an epoch (caller broke after the last batch, or a state saved there) moves on to the next
epoch when iteration starts. ``state_dict()`` is a str/int dict; ``load_state_dict`` is
O(1): it only checks and sets numbers (the epoch's order is recomputed lazily). It checks
store fingerprint, split, (global) batch size and subset (size and content digest), and
adopts the saved order-defining settings (seed, shuffle, order, block sizes, drop_last,
augment): the state decides the stream. Each rank keeps its own ``rank`` and ``world_size``,
so every rank may load rank 0's state, saved with any world size (elastic resume).

Processes. Nothing is opened in ``__init__`` except a validating look at the store
(closed at once). The reader (its file, its pool of read threads) and the prefetch thread
are created on first iteration in the process that iterates; ``close()`` / the context
manager release them and join every thread, and a later iteration reopens. A child made by
``fork`` notices the new pid and opens its own reader (never touching the parent's h5py
handle, file or threads, which a fork does not copy anyway); pickling (``spawn``, ``forkserver``)
drops reader, thread and buffers (``__getstate__``) and keeps the position.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from streamnn.errors import StreamnnError
from streamnn.data.order import ORDERS, batch_span, batches_consumed, block_order, epoch_order, n_batches, samples_consumed, \
    share, share_size
from streamnn.data.readers import READERS, RowReader, open_rows
from streamnn.data.store import open_store
from streamnn.data.transforms import DEFAULT_SHIFT, Augment, flip_images, shift_images, standardization

__all__ = ["Loader", "block_order", "ORDERS"]
#: Contiguous data: block size of ``order="block"``, in bytes of stored rows.
BLOCK_BYTES = 1 << 20
#: Blocks shuffled together by ``order="block"``.
WINDOW_BLOCKS = 16
STATE_VERSION = 2  # 2: global batches with interleaved shares, position also as samples
#: Default of ``Loader.prefetch_policy``.
PREFETCH_POLICY = "auto"

# h5py handles and threads of a parent process, kept alive but never touched in a forked
# child (closing them there could deadlock on a lock copied in the locked state).
_ORPHANS: list[Any] = []


def _ema(old: float | None, new: float, alpha: float = 0.2) -> float:
    return new if old is None else old + alpha * (new - old)


def _int(value: Any, name: str, low: int, where: Any = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise StreamnnError(f"{name} must be an integer >= {low}, got {value!r}", where)
    return int(value)


class Loader:
    """Mini-batches ``(X, Y)`` of one split of a store; see the module docstring.

    Parameters mirror the contract in the module docstring. ``subset``: 1-D array of distinct
    row indices of the split to iterate (e.g. the training part of a train/validation
    split); the epoch permutes the subset. ``block_rows`` / ``window_blocks`` tune
    ``order="block"``.
    """

    def __init__(self, path: str | os.PathLike, split: str, batch_size: int = 64, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, standardize: bool = False, augment: str | None = None,
                 one_hot: bool = False, rank: int = 0, world_size: int = 1, order: str = "exact",
                 prefetch: int = 2, subset: Any = None, block_rows: int | None = None,
                 window_blocks: int = WINDOW_BLOCKS, shift: int = DEFAULT_SHIFT, shift_padding: str = "reflect",
                 reader: str = "auto") -> None:
        self.path = Path(os.path.abspath(os.fspath(path)))
        self.split = str(split)
        self.batch_size = _int(batch_size, "batch size", 1, self.path)
        self.seed = _int(seed, "seed", 0)
        self.world_size = _int(world_size, "world_size", 1)
        self.rank = _int(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise StreamnnError(f"rank {rank} is not below world_size {world_size}")
        self.prefetch = _int(prefetch, "prefetch", 0)
        if order not in ORDERS:
            raise StreamnnError(f"unknown order {order!r} (choose exact or block)")
        self._augment = Augment.parse(augment, shift, shift_padding)
        self.order, self.augment = order, self._augment.spec
        if reader not in READERS:
            raise StreamnnError(f"unknown reader {reader!r} (choose {', '.join(READERS)})")
        #: I/O of the default store layout: "auto" (by size), "mmap" or "pread" (not part of the state).
        self.reader = reader
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.one_hot, self.standardize = bool(one_hot), bool(standardize)
        self.window_blocks = _int(window_blocks, "window_blocks", 1)
        #: "auto" (thread only while the caller works between batches), "thread" or "inline".
        self.prefetch_policy = PREFETCH_POLICY

        with open_store(self.path) as store:
            ds = store.dataset(self.split)  # unknown split: one-line error
            self.fingerprint = store.fingerprint
            self.class_names = list(store.class_names)
            self.image_shape = tuple(store.image_shape)
            self.n_features = store.n_features
            self.split_rows = int(ds.shape[0])
            chunk_rows = int(ds.chunks[0]) if ds.chunks is not None else None
            row_bytes = self.n_features * ds.dtype.itemsize
            labels = store.labels(self.split)
            stats = store.stats() if self.standardize else None
            if self.standardize and stats is None:
                raise StreamnnError("standardize needs the store's /stats (mean, std), which this store "
                                    "does not have (repack it with statistics, or do not standardize)", self.path)
        self.n_classes = len(self.class_names)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise StreamnnError(f"split {self.split!r} has labels outside 0..{self.n_classes - 1}", self.path)
        self._labels = labels.astype(np.int32)
        self.block_rows = (_int(block_rows, "block_rows", 1) if block_rows is not None
                           else chunk_rows or max(1, BLOCK_BYTES // row_bytes))

        self._subset: np.ndarray | None = None
        self._subset_digest = ""
        if subset is not None:
            self._subset, self._subset_digest = self._check_subset(subset)
        self.n_rows = len(self._subset) if self._subset is not None else self.split_rows

        self._mean32 = self._inv32 = None
        if stats is not None:
            mean, std = (np.asarray(a, np.float64) for a in stats)
            if mean.shape != (self.n_features,) or std.shape != (self.n_features,):
                raise StreamnnError(f"store /stats have shapes {mean.shape} and {std.shape}, expected "
                                    f"({self.n_features},)", self.path)
            self._mean32, self._inv32 = standardization(mean, std)

        self.epoch = 0
        self.position = 0
        self._iteration = 0  # counts loops started: an older loop that is resumed raises
        self._reset_resources()

    # -- validation helpers ----------------------------------------------------------------------
    def _check_subset(self, subset: Any) -> tuple[np.ndarray, str]:
        arr = np.asarray(subset)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise StreamnnError(f"subset must be a 1-D array of row indices, got {arr.dtype} of shape {arr.shape}")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.split_rows):
            raise StreamnnError(f"subset has rows outside 0..{self.split_rows - 1} of split {self.split!r}", self.path)
        if len(np.unique(arr)) != len(arr):
            raise StreamnnError("subset repeats rows (each row may appear once)")
        digest = hashlib.sha256(np.ascontiguousarray(arr, "<i8").tobytes()).hexdigest()[:16]
        return arr, digest

    # -- sizes -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch (global batches: the same number on every rank)."""
        return n_batches(self.n_rows, self.batch_size, self.drop_last)

    @property
    def n_batches(self) -> int:
        return len(self)

    @property
    def local_batch_size(self) -> int:
        """Most rows of a batch this rank yields (its share of a full global batch)."""
        return share_size(self.batch_size, 0, self.world_size)

    def global_batch_size(self, k: int) -> int:
        """Rows of global batch ``k`` over all ranks (the count a mean over the batch divides by)."""
        span = batch_span(self.n_rows, self.batch_size, k)
        return span.stop - span.start

    @property
    def n_samples(self) -> int:
        """Samples per epoch on this rank."""
        full, last = divmod(self.n_rows, self.batch_size)
        rest = share_size(last, self.rank, self.world_size) if last and not self.drop_last else 0
        return full * share_size(self.batch_size, self.rank, self.world_size) + rest

    # -- the order -------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        """All rows of the epoch (stored row numbers), on every rank (cached for the last few epochs)."""
        with self._plan_lock:
            rows = self._plans.get(epoch)
            if rows is None:
                base = self._subset if self._subset is not None else np.arange(self.n_rows, dtype=np.int64)
                rows = np.ascontiguousarray(epoch_order(base, self.seed, epoch, shuffle=self.shuffle, order=self.order,
                                                        block_rows=self.block_rows,
                                                        window_blocks=self.window_blocks), dtype=np.int64)
                self._plans[epoch] = rows
                while len(self._plans) > 3:
                    self._plans.popitem(last=False)
            return rows

    def batch_rows(self, epoch: int, k: int) -> np.ndarray:
        """Stored row numbers of this rank's share of global batch ``k`` of ``epoch``."""
        rows = self._epoch_order(epoch)[batch_span(self.n_rows, self.batch_size, k)]
        return share(rows, self.rank, self.world_size)

    # -- producing one batch ---------------------------------------------------------------------
    def _produce(self, epoch: int, k: int, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = self.batch_rows(epoch, k)
        b = len(rows)
        out = buf[:b]
        reader = self._reader
        if reader.reads_ahead:  # announce the next batches along the epoch order (read meanwhile)
            for key in self._ahead(epoch, k + 1, reader.ahead_batches(self.local_batch_size)):
                reader.expect(key, self.batch_rows(*key))
        out = reader.read(rows, out, key=(epoch, k))  # or the reader's own buffer (zero copy)
        aug = self._augment
        if aug.flip or aug.shift:
            h, w, c = self.image_shape
            imgs = out.reshape(b, h, w, c)
            n, gb, where = aug.shift, self.global_batch_size(k), (self.rank, self.world_size)
            if aug.flip:
                if self._flip_scratch is None:
                    self._flip_scratch = np.empty((self.local_batch_size, h, w, c), np.float32)
                flip_images(imgs, aug.flips(self.seed, epoch, k, gb, *where), self._flip_scratch)
            if n:
                if self._shift_scratch is None:
                    self._shift_scratch = np.empty((self.local_batch_size, h + 2 * n, w + 2 * n, c), np.float32)
                shift_images(imgs, aug.shifts(self.seed, epoch, k, gb, *where), n, aug.padding, self._shift_scratch)
        if self._mean32 is not None:
            out -= self._mean32
            out *= self._inv32
        return out.T, self._targets(rows)

    def _targets(self, rows: np.ndarray) -> np.ndarray:
        labels = self._labels[rows]
        if self.one_hot:
            Y = np.zeros((self.n_classes, len(rows)), np.float32)
            Y[labels, np.arange(len(rows))] = 1.0
            return Y
        if self.n_classes <= 2:
            return labels.astype(np.float32).reshape(1, -1)
        return labels.astype(np.int64).reshape(1, -1)

    # -- resources -------------------------------------------------------------------------------
    def _reset_resources(self) -> None:
        self._pid: int | None = None
        self._reader: RowReader | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: OrderedDict[tuple[int, int], tuple[concurrent.futures.Future | None, int]] = OrderedDict()
        self._buffers: list[np.ndarray] = []
        self._free: list[int] = []
        self._held: deque[int] = deque()
        self._flip_scratch: np.ndarray | None = None
        self._shift_scratch: np.ndarray | None = None
        self._plans: OrderedDict[int, np.ndarray] = OrderedDict()
        self._plan_lock = threading.Lock()
        self._returned_at: float | None = None
        self._consumer_s: float | None = None  # caller's time between batches (EMA)
        self._produce_s: float | None = None  # time to produce a batch (EMA)
        self._thread_on = False
        self.batches_threaded = self.batches_inline = 0

    def _adopt_process(self) -> None:
        """In a forked child, drop (never touch) the parent's reader, thread and pending work."""
        if self._pid is not None and self._pid != os.getpid():
            _ORPHANS.append((self._reader, self._executor, self._pending, self._plan_lock))
            self._reset_resources()

    def _open(self) -> None:
        """The reader of this process, opened on first use."""
        self._adopt_process()
        if self._reader is None:
            reader = open_rows(self.path, self.split, fingerprint=self.fingerprint,
                               cached_bands=self.window_blocks + 2, reader=self.reader)
            if reader.n_rows != self.split_rows:
                reader.close()
                raise StreamnnError(f"split {self.split!r} changed size since the loader was made", self.path)
            reader.lend = self.prefetch + 2  # as the X ring: the caller's two batches + the prefetched
            self._reader, self._pid = reader, os.getpid()

    @property
    def threaded(self) -> bool:
        """Whether a prefetch thread may produce batches (memory-mapped reader and prefetch > 0)."""
        return self.prefetch > 0 and self._reader is not None and self._reader.releases_gil

    @property
    def reader_mode(self) -> str:
        """The I/O strategy: "memmap", "pread", "hdf5" or "chunks" (opens the reader)."""
        self._open()
        return self._reader.mode  # type: ignore[union-attr]

    def _acquire(self) -> int:
        if self._free:
            return self._free.pop()
        self._buffers.append(np.empty((self.local_batch_size, self.n_features), np.float32))
        return len(self._buffers) - 1

    def _discard(self, key: tuple[int, int]) -> None:
        fut, slot = self._pending.pop(key)
        if fut is not None and not fut.cancel():
            concurrent.futures.wait([fut])  # running: let it finish before its buffer is reused
        self._free.append(slot)

    def _discard_all(self) -> None:
        for key in list(self._pending):
            self._discard(key)

    def _ahead(self, epoch: int, k: int, count: int) -> list[tuple[int, int]]:
        """The keys of the next ``count`` batches from (epoch, k), crossing into later epochs."""
        nb = len(self)
        keys = []
        while len(keys) < count and nb:
            if k >= nb:
                epoch, k = epoch + 1, 0
            keys.append((epoch, k))
            k += 1
        return keys

    def _use_thread(self) -> bool:
        """Produce ahead in the thread now? Only while the caller works long enough between batches
        to hide a read: with a caller that only loops, handing batches across threads costs more
        than it saves (wake-ups; on a busy machine the second thread waits for a core)."""
        if not self.threaded or self.prefetch_policy == "inline":
            return False
        if self.prefetch_policy == "thread":
            return True
        c, p = self._consumer_s, self._produce_s
        if c is not None and p is not None:
            self._thread_on = c > (0.5 if self._thread_on else 1.0) * p  # hysteresis
        return self._thread_on

    def _produce_timed(self, epoch: int, k: int, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = time.perf_counter()
        result = self._produce(epoch, k, buf)
        self._produce_s = _ema(self._produce_s, time.perf_counter() - t)
        return result

    def _get(self, epoch: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._reader is None or self._pid != os.getpid():
            self._open()  # closed mid-loop, or a forked child going on with its parent's loop
        now = time.perf_counter()
        if self._returned_at is not None:
            self._consumer_s = _ema(self._consumer_s, now - self._returned_at)
        # The batch two before this one may now be overwritten.
        while len(self._held) >= 2:
            self._free.append(self._held.popleft())
        key = (epoch, k)
        if self._use_thread():
            wanted = self._ahead(epoch, k, self.prefetch + 1)
            for old in [old for old in self._pending if old not in wanted]:
                self._discard(old)
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamnn-loader")
            for ahead in wanted:
                if ahead not in self._pending:
                    slot = self._acquire()
                    fut = self._executor.submit(self._produce_timed, ahead[0], ahead[1], self._buffers[slot])
                    self._pending[ahead] = (fut, slot)
        elif key not in self._pending:
            self._discard_all()  # the reader is used by one thread at a time
        if key in self._pending:
            fut, slot = self._pending.pop(key)
            self.batches_threaded += 1
        else:
            fut, slot = None, self._acquire()
            self.batches_inline += 1
        try:
            X, Y = fut.result() if fut is not None else self._produce_timed(epoch, k, self._buffers[slot])
        except BaseException:
            self._free.append(slot)
            raise
        self._held.append(slot)
        self._returned_at = time.perf_counter()
        return X, Y

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self._open()
        if len(self) and self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        self._iteration += 1
        return self._run(self._iteration)

    def _run(self, token: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        epoch, nb = self.epoch, len(self)
        k = self.position
        while k < nb:
            if token != self._iteration or (self.epoch, self.position) != (epoch, k):
                raise StreamnnError("the loader was restarted or its state changed while a loop over it "
                                    "was running (use one loop at a time)")
            X, Y = self._get(epoch, k)
            self.position = k = k + 1
            yield X, Y
        if token == self._iteration and (self.epoch, self.position) == (epoch, nb):
            self.epoch, self.position = epoch + 1, 0

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, str | int]:
        """Everything needed to continue this stream (str and int values only)."""
        return {
            "version": STATE_VERSION, "fingerprint": self.fingerprint, "split": self.split,
            "seed": self.seed, "epoch": self.epoch, "position": self.position,
            "samples": samples_consumed(self.n_rows, self.batch_size, self.position), "batch_size": self.batch_size,
            "rank": self.rank, "world_size": self.world_size,
            "n_samples": self.n_samples, "n_rows": self.n_rows, "subset": self._subset_digest,
            "order": self.order, "block_rows": self.block_rows, "window_blocks": self.window_blocks,
            "drop_last": int(self.drop_last), "augment": self.augment or "none", "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream saved by :meth:`state_dict` (O(1); nothing changes on error)."""
        if not isinstance(state, Mapping):
            raise StreamnnError(f"loader state must be a dict, got {type(state).__name__}")
        need = ("fingerprint", "split", "seed", "epoch", "position", "batch_size", "world_size",
                "n_rows", "subset", "order", "drop_last", "augment", "shuffle")
        missing = [k for k in need if k not in state]
        if missing:
            raise StreamnnError(f"loader state lacks {', '.join(missing)}")

        def text(key: str) -> str:
            v = state[key]
            return v.decode() if isinstance(v, bytes) else str(v)

        def num(key: str, low: int = 0) -> int:
            v = state[key]
            if isinstance(v, np.ndarray) and v.shape == ():
                v = v.item()
            return _int(v, f"loader state {key}", low)

        if text("fingerprint") != self.fingerprint:
            raise StreamnnError(f"loader state is for another store or the store changed since it was saved "
                                f"(fingerprint {text('fingerprint')[:12]}..., this store {self.fingerprint[:12]}...)",
                                self.path)
        if text("split") != self.split:
            raise StreamnnError(f"loader state is for split {text('split')!r}, this loader reads {self.split!r}")
        if num("batch_size", 1) != self.batch_size:
            raise StreamnnError(f"loader state has batch size {num('batch_size')}, this loader {self.batch_size}")
        if int(state.get("version", 1)) < 2 and num("world_size", 1) > 1:
            raise StreamnnError(f"loader state of version {num('version')} has contiguous shares of "
                                f"{num('world_size')} ranks, which this version does not continue")
        if num("n_rows") != self.n_rows or text("subset") != self._subset_digest:
            raise StreamnnError(f"loader state iterates {num('n_rows')} rows "
                                f"({'a subset' if text('subset') else 'the whole split'}), this loader "
                                f"{self.n_rows} ({'a subset' if self._subset_digest else 'the whole split'})"
                                + (" with other rows" if num("n_rows") == self.n_rows else ""))
        order = text("order")
        if order not in ORDERS:
            raise StreamnnError(f"loader state has unknown order {order!r}")
        try:
            augment = Augment.parse(text("augment"), self._augment.shift or DEFAULT_SHIFT, self._augment.padding)
        except StreamnnError:
            raise StreamnnError(f"loader state has unknown augment {text('augment')!r}") from None
        new = {
            "seed": num("seed"), "order": order, "augment": augment.spec, "_augment": augment,
            "shuffle": bool(num("shuffle")), "drop_last": bool(num("drop_last")),
            "block_rows": num("block_rows", 1) if "block_rows" in state else self.block_rows,
            "window_blocks": num("window_blocks", 1) if "window_blocks" in state else self.window_blocks,
        }
        epoch, position = num("epoch"), num("position")
        nb = n_batches(self.n_rows, self.batch_size, new["drop_last"])
        if position > nb:
            raise StreamnnError(f"loader state is at batch {position} of an epoch that has {nb}")
        if "samples" in state:
            samples = num("samples")
            if samples != samples_consumed(self.n_rows, self.batch_size, position) \
                    or batches_consumed(self.n_rows, self.batch_size, samples) != position:
                raise StreamnnError(f"loader state is at {samples} samples but batch {position}: they disagree")
        # All checked: stop the prefetch work of the old stream, then apply.
        self._adopt_process()
        self._discard_all()
        if self._reader is not None:
            self._reader.forget()
        changed = any(getattr(self, k) != v for k, v in new.items())
        for k, v in new.items():
            setattr(self, k, v)
        if changed:
            with self._plan_lock:
                self._plans.clear()
        if nb and position == nb:
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position
        self._iteration += 1  # a loop that was running stops with a clear error

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the reader, the prefetch thread and the buffers (a later loop reopens them)."""
        self._adopt_process()
        self._discard_all()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
        self._reset_resources()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_reader", "_executor", "_pending", "_buffers", "_free", "_held", "_flip_scratch", "_shift_scratch",
                    "_plans", "_plan_lock", "_pid", "_returned_at", "_consumer_s", "_produce_s",
                    "_thread_on", "batches_threaded", "batches_inline"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._iteration = 0
        self._reset_resources()

    def __repr__(self) -> str:
        return (f"Loader({str(self.path)!r}, {self.split!r}, batch_size={self.batch_size}, rows={self.n_rows}, "
                f"epoch={self.epoch}, position={self.position}/{len(self)})")

