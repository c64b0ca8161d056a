"""The row readers' base class: ``read(rows, out)`` fills a caller's buffer with normalized rows,
and :class:`FileWatch`, with which every reader notices a store file that changes under it."""
from __future__ import annotations

import os
from collections.abc import Hashable, Sequence

import cv2
import numpy as np

from streamnn.errors import StreamnnError


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies a file's version: device, inode, size, modification time (ns)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class FileWatch:
    """The identity of a store file a reader holds open (descriptor ``fd``, opened by ``path``),
    recorded when it is opened and checked before (and after) every batch it reads.

    :meth:`check` compares an ``fstat`` of the open descriptor with the recorded identity (the
    file truncated, or rewritten in place: size or modification time differ; a memory map read
    past a truncated end would die by SIGBUS) and, with ``path``, a ``stat`` of the path (another
    file renamed over it, or the file moved or deleted: a repack). About 1 us per call. ``need``:
    bytes the file must hold (the end of the rows read). ``expect``: the identity the file had
    when its layout was read (by h5py): a file replaced in between is refused too.
    """

    def __init__(self, path: str, fd: int, need: int = 0, expect: tuple[int, int, int, int] | None = None) -> None:
        self.path, self.fd, self.need = path, fd, int(need)
        self.identity = identity(os.fstat(fd))
        if expect is not None and expect != self.identity:
            raise self._changed("the file changed while it was opened")
        if self.identity[2] < self.need:
            raise StreamnnError(f"the store ends at byte {self.identity[2]}, before the end of its rows "
                                f"({self.need}: truncated?)", path)
        self.check()

    def _changed(self, how: str) -> StreamnnError:
        return StreamnnError(f"the store changed while it was being read ({how}); stopping rather than "
                             f"reading other data (restart on the store as it is now)", self.path)

    def check(self, path: bool = True) -> None:
        """Raise a one-line StreamnnError if the file changed since it was opened."""
        now = identity(os.fstat(self.fd))
        if now != self.identity:
            size = now[2]
            raise self._changed(f"truncated to {size} bytes" if size < self.identity[2] else
                                f"its size changed from {self.identity[2]} to {size} bytes" if size != self.identity[2]
                                else "rewritten in place: its modification time changed")
        if path:
            try:
                there = identity(os.stat(self.path))
            except OSError:
                raise self._changed("its path no longer names a file: moved or deleted") from None
            if there != self.identity:
                raise self._changed("another file was put at its path: replaced")


#: Batch buffers start on a page (:func:`page_aligned`).
PAGE = 4096


def normalize_into(raw: np.ndarray, out: np.ndarray, scale: np.float32) -> np.ndarray:
    """``out[...] = float32(raw) * scale``: stored values to normalized float32, ``out`` returned.

    Every value is the cast, then one float32 multiply rounded once (``Store.normalize``'s and the
    Loader's values, whatever does the work). uint8 into float32, both C-contiguous, goes through
    one SIMD pass of OpenCV (``cv2.multiply`` with ``scale``: the product of a byte and a float32
    is exact in double, so its one rounding to float32 is NumPy's); measured on a batch of 64
    64x64x3 rows: 0.046 ms on one thread where NumPy's cast then multiply in place took 0.117 ms
    (``python tools/bench_bound.py``). Anything else: the cast into ``out``, then the multiply in
    place (one mixed-type ``np.multiply`` casts through NumPy's small ufunc buffers: 1.2-1.3x
    slower)."""
    if (raw.dtype == np.uint8 and out.dtype == np.float32 and raw.shape == out.shape and raw.size > 4
            and raw.flags.c_contiguous and out.flags.c_contiguous):
        # 2-D views (OpenCV reads a 1-element array as a scalar, more than 2 axes as channels)
        src, dst = raw.reshape(-1, raw.shape[-1] if raw.ndim else 1), out.reshape(-1, out.shape[-1] if out.ndim else 1)
        if cv2.multiply(src, 1.0, dst=dst, scale=float(scale), dtype=cv2.CV_32F) is dst:
            return out
    np.copyto(out, raw, casting="unsafe")
    if scale != 1:
        np.multiply(out, scale, out=out)
    return out


def page_aligned(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialized C-ordered array whose data starts on a page boundary; its ``base`` is
    the block it lies in, which every view of it references.

    Rows copied from a page-aligned store (:data:`~streamnn.data.format.X_ALIGNMENT`) into a
    buffer that starts 16 bytes into a page (where ``np.empty`` puts a large array) have loads
    that alias the stores just made (the same address bits below 4096): a row copy is then up
    to 2x slower (64x64x3 float32 rows, ``tools/bench_loader.py --bound``)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    block = np.empty(nbytes + PAGE, np.uint8)
    start = -block.ctypes.data % PAGE
    return block[start:start + nbytes].view(dtype).reshape(shape)


def check_files(watches: Sequence[FileWatch], path: bool = True) -> None:
    for watch in watches:
        watch.check(path)

#: Batches a reader that reads ahead is told of at most (small batches: announcing costs per batch).
AHEAD_BATCHES = 64


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
        #: The files the reader reads (:class:`FileWatch`), checked with every batch.
        self.watches: list[FileWatch] = []

    def _staging(self, n: int, dtype: np.dtype | None = None) -> np.ndarray:
        dtype = np.dtype(dtype or self.dtype)
        if self._stage is None or self._stage.shape[0] < n or self._stage.dtype != dtype:
            self._stage = page_aligned((max(n, 1), self.n_features), dtype)
        return self._stage[:n]

    def _convert(self, raw: np.ndarray, out: np.ndarray) -> None:
        """Stored rows to normalized float32 (same values as ``Store.normalize``): :func:`normalize_into`."""
        normalize_into(raw, out, self._scale32)

    def _scale(self, out: np.ndarray) -> None:
        """Stored values already cast into ``out`` (float32) to normalized ones, in place."""
        if self.scale != 1.0:
            np.multiply(out, self._scale32, out=out)

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

    def check(self, path: bool = True) -> None:
        """Raise a one-line StreamnnError if a file the reader reads changed since it was opened."""
        check_files(self.watches, path)

    def close(self) -> None:
        self._stage = None
        self.watches = []

