"""The row readers' base class: ``read(rows, out)`` fills a caller's buffer with normalized rows."""
from __future__ import annotations

from collections.abc import Hashable

import numpy as np

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

