"""Making a :class:`~streamnn.data.loader.Loader`'s batches: read, augment and standardize batch k of
an epoch into a ring of buffers, ahead in a prefetch thread while that pays (design: docs/loader.md).

:func:`epoch_batches` is what ``for X, Y in loader`` iterates: the rest of the current epoch, each
batch made by the loader's :class:`BatchMaker`, which owns what the loader holds in the process
that iterates: the row reader (:mod:`streamnn.data.readers`), the prefetch thread, the X buffers.

* X is the transpose view ``buf[:b].T`` of a C-ordered ``(b, D)`` buffer: (D, b), F-contiguous,
  no copy (BLAS takes either layout; a transposing copy would cost ~5x the gather).
* X buffers come from a ring of ``prefetch + 2``. By default batches are safe to keep: a buffer is
  reused only when nothing references it any more (the caller dropped the batch's X and every view
  of it), else it is replaced by a new one. ``loader.reuse_buffers`` opts out: a batch's X stays
  intact while the next one is used, and may be overwritten once the batch two after it is
  requested. Y is a fresh array.
* Readers that read ahead (``pread``) are told of the next batches of the order before batch k
  is read; float32 batches may then be the reader's own buffer, lent for ``prefetch + 2`` batches
  (with ``reuse_buffers`` only: safe batches copy it).
* With a reader that releases the GIL and ``prefetch`` > 0, one thread produces the next
  ``prefetch`` batches (crossing into the next epoch) while the caller's time between batches
  exceeds the time to produce one (running means, with hysteresis), else each batch is made in
  the caller's thread; ``loader.prefetch_policy`` ("auto", "thread", "inline") overrides that.
  h5py readers are always used in the caller's thread.

Batches are the same whatever the reader, prefetch depth or policy: each is a pure function of
(epoch, index).
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from streamnn.data.readers import RowReader, open_rows
from streamnn.data.readers.base import page_aligned
from streamnn.data.transforms import erase_images, flip_images, shift_images
from streamnn.errors import StreamnnError


class Takes:
    """The batches of an epoch that a consumer takes, for reading ahead: runs of ``run`` consecutive
    batches every ``step`` batches, from batch ``first`` of the current epoch and from batch
    ``again`` of each later one. A DataLoader worker w of N taking groups of G: ``run`` G, ``step``
    N x G, ``again`` w x G. The default takes every batch."""

    def __init__(self, first: int = 0, run: int = 1, step: int = 1, again: int = 0) -> None:
        self.first, self.run, self.step, self.again = int(first), max(1, int(run)), max(1, int(step)), int(again)

    def next(self, k: int, later: bool = False) -> int:
        """The first batch >= ``k`` taken (of the current epoch, or of a ``later`` one)."""
        d = k - (self.again if later else self.first)
        if d < 0:
            return k - d
        r = d % self.step
        return k if r < self.run else k + self.step - r


def _ema(old: float | None, new: float, alpha: float = 0.2) -> float:
    return new if old is None else old + alpha * (new - old)


def epoch_batches(loader: Any, token: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The rest of ``loader``'s current epoch from its position, which it advances; a loop that is
    not the loader's latest (``token``) or whose position was moved under it stops with an error."""
    epoch, nb = loader.epoch, len(loader)
    k = loader.position
    while k < nb:
        if token != loader._iteration or (loader.epoch, loader.position) != (epoch, k):
            raise StreamnnError("the loader was restarted or its state changed while a loop over it "
                                "was running (use one loop at a time)")
        X, Y = loader._batches().get(epoch, k)  # reopened if closed mid-loop or in a forked child
        loader.position = k = k + 1
        yield X, Y
    if token == loader._iteration and (loader.epoch, loader.position) == (epoch, nb):
        loader.epoch, loader.position = epoch + 1, 0


class BatchMaker:
    """The batches of one :class:`~streamnn.data.loader.Loader` (``loader``, whose settings it
    reads as they are at each batch) in the process that made it: its reader, opened here, its
    prefetch thread and buffers. :meth:`close` releases them and joins the thread."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        reader = open_rows(loader.path, loader.split, fingerprint=loader.fingerprint,
                           cached_bands=loader.window_blocks + 2, reader=loader.reader)
        if reader.n_rows != loader.split_rows:
            reader.close()
            raise StreamnnError(f"split {loader.split!r} changed size since the loader was made", loader.path)
        reader.lend = loader.prefetch + 2  # as the X ring: the caller's two batches + the prefetched
        self.reader: RowReader = reader
        #: The process that made it (a forked child drops it, never touching it).
        self.pid = os.getpid()
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.pending: OrderedDict[tuple[int, int], tuple[concurrent.futures.Future | None, int]] = OrderedDict()
        self._buffers: list[np.ndarray] = []
        self._free: list[int] = []
        self._held: deque[int] = deque()
        self._flip_scratch: np.ndarray | None = None
        self._shift_scratch: np.ndarray | None = None
        self._returned_at: float | None = None
        self._consumer_s: float | None = None  # caller's time between batches (EMA)
        self._produce_s: float | None = None  # time to produce a batch (EMA)
        self._thread_on = False
        self.batches_threaded = self.batches_inline = 0

    @property
    def threaded(self) -> bool:
        """Whether a prefetch thread may produce batches (a reader that releases the GIL, prefetch > 0)."""
        return self.loader.prefetch > 0 and self.reader.releases_gil

    def produce(self, epoch: int, k: int, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``k`` of ``epoch``: X into ``buf`` (or the reader's lent buffer), and Y."""
        L = self.loader
        rows = L.batch_rows(epoch, k)
        b = len(rows)
        out = buf[:b]
        reader = self.reader
        if reader.reads_ahead:  # announce the next batches along the epoch order (read meanwhile)
            for key in self._ahead(epoch, k + 1, reader.ahead_batches(max(1, L.local_batch_size))):
                reader.expect(key, L.batch_rows(*key))
        got = reader.read(rows, out, key=(epoch, k))  # or the reader's own buffer (zero copy)
        if got is not out:
            if L.reuse_buffers:
                out = got
            else:  # the reader reuses its buffer later, whatever the caller keeps: copy
                np.copyto(out, got)
        aug = L._augment
        if aug.flip or aug.shift:
            h, w, c = L.image_shape
            imgs = out.reshape(b, h, w, c)
            n, gb, where = aug.shift, L.global_batch_size(k), (L.rank, L.world_size)
            if aug.flip:
                if self._flip_scratch is None:
                    self._flip_scratch = np.empty((L.local_batch_size, h, w, c), np.float32)
                flip_images(imgs, aug.flips(L.seed, epoch, k, gb, *where), self._flip_scratch)
            if n:
                if self._shift_scratch is None:
                    self._shift_scratch = np.empty((L.local_batch_size, h + 2 * n, w + 2 * n, c), np.float32)
                shift_images(imgs, aug.shifts(L.seed, epoch, k, gb, *where), n, aug.padding, self._shift_scratch)
        if L._mean32 is not None:
            out -= L._mean32
            out *= L._inv32
        if aug.erase:  # after standardization: erased pixels are 0 in the model input
            erase_images(out.reshape(b, *L.image_shape),
                         aug.erasures(L.seed, epoch, k, L.global_batch_size(k), L.image_shape, L.rank, L.world_size))
        return out.T, self.targets(rows)

    def targets(self, rows: np.ndarray) -> np.ndarray:
        """Y of the batch of stored rows ``rows`` (a fresh array)."""
        L = self.loader
        labels = L._labels[rows]
        if L.one_hot:
            Y = np.zeros((L.n_classes, len(rows)), np.float32)
            Y[labels, np.arange(len(rows))] = 1.0
            return Y
        if L.n_classes <= 2:
            return labels.astype(np.float32).reshape(1, -1)
        return labels.astype(np.int64).reshape(1, -1)

    def _acquire(self) -> int:
        shape = (self.loader.local_batch_size, self.loader.n_features)
        if self._free:
            slot = self._free.pop()
            # Safe batches (the default): a buffer that a batch still uses (the caller kept its X, or
            # a view of it) is left to the caller and replaced, never overwritten. Every view of a
            # page-aligned buffer references its block (``base``); references to the block here:
            # the buffer and getrefcount's argument.
            if not self.loader.reuse_buffers and sys.getrefcount(self._buffers[slot].base) > 2:
                self._buffers[slot] = page_aligned(shape, np.float32)
            return slot
        self._buffers.append(page_aligned(shape, np.float32))
        return len(self._buffers) - 1

    def _discard(self, key: tuple[int, int]) -> None:
        fut, slot = self.pending.pop(key)
        if fut is not None and not fut.cancel():
            concurrent.futures.wait([fut])  # running: let it finish before its buffer is reused
        self._free.append(slot)

    def _discard_all(self) -> None:
        for key in list(self.pending):
            self._discard(key)

    def _ahead(self, epoch: int, k: int, count: int) -> list[tuple[int, int]]:
        """The keys of the next ``count`` batches from (epoch, k) that the consumer takes
        (``loader.takes``: every batch, or a DataLoader worker's share), crossing into later epochs."""
        nb, takes = len(self.loader), self.loader.takes
        keys: list[tuple[int, int]] = []
        later, found = False, True
        while len(keys) < count and nb:
            k = takes.next(k, later)
            if k >= nb:
                if later and not found:
                    break  # the consumer takes nothing of a later epoch
                epoch, k, later, found = epoch + 1, 0, True, False
                continue
            keys.append((epoch, k))
            k, found = k + 1, True
        return keys

    def _use_thread(self) -> bool:
        """Produce ahead in the thread now? Only while the caller works long enough between batches
        to hide a read: with a caller that only loops, handing batches across threads costs more
        than it saves (wake-ups; on a busy machine the second thread waits for a core)."""
        if not self.threaded or self.loader.prefetch_policy == "inline":
            return False
        if self.loader.prefetch_policy == "thread":
            return True
        c, p = self._consumer_s, self._produce_s
        if c is not None and p is not None:
            self._thread_on = c > (0.5 if self._thread_on else 1.0) * p  # hysteresis
        return self._thread_on

    def _produce_timed(self, epoch: int, k: int, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = time.perf_counter()
        result = self.produce(epoch, k, buf)
        self._produce_s = _ema(self._produce_s, time.perf_counter() - t)
        return result

    def get(self, epoch: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        now = time.perf_counter()
        if self._returned_at is not None:
            self._consumer_s = _ema(self._consumer_s, now - self._returned_at)
        # The batch two before this one may now be overwritten.
        while len(self._held) >= 2:
            self._free.append(self._held.popleft())
        key = (epoch, k)
        if self._use_thread():
            wanted = self._ahead(epoch, k, self.loader.prefetch + 1)
            for old in [old for old in self.pending if old not in wanted]:
                self._discard(old)
            if self.executor is None:
                self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamnn-loader")
            for ahead in wanted:
                if ahead not in self.pending:
                    slot = self._acquire()
                    fut = self.executor.submit(self._produce_timed, ahead[0], ahead[1], self._buffers[slot])
                    self.pending[ahead] = (fut, slot)
        elif key not in self.pending:
            self._discard_all()  # the reader is used by one thread at a time
        if key in self.pending:
            fut, slot = self.pending.pop(key)
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

    def forget(self) -> None:
        """Drop the batches made or announced ahead (the loader's stream jumped elsewhere)."""
        self._discard_all()
        self.reader.forget()

    def close(self) -> None:
        """Stop the prefetch work, join the thread, close the reader."""
        self._discard_all()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.reader.close()
