"""The HDF5-library fallbacks, read with h5py in the caller's thread.

``hdf5``    (contiguous but not mappable: non-native byte order, a non-default driver)
    Sorted unique rows read with one h5py call per batch (a point-union selection), then
    put back in batch order.
``chunks``  (chunked datasets, compressed or not)
    Rows are grouped by chunk band (``chunks[0]`` rows); each needed band is read whole with
    one h5py call (decompressed once) into a small LRU of bands, and rows are copied out of
    it. With the loader's ``order="block"`` (blocks = chunk bands) every band is read once
    per epoch; with the exact random order a batch touches ~one band per row, which is
    correct but slow for compressed stores (decompress a whole chunk per row).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable

import h5py
import numpy as np

from streamnn.data.readers.base import FileWatch, RowReader

#: Row bands (chunks) kept decompressed by the ``chunks`` strategy, at least.
MIN_CACHED_BANDS = 4


class _H5Reader(RowReader):
    """``read`` is :meth:`_read` between checks of the file (:class:`~.base.FileWatch`, on a
    descriptor of its own: HDF5 does not notice a file truncated or rewritten under it)."""

    def __init__(self, file: h5py.File, dset: h5py.Dataset, dtype: np.dtype, scale: float,
                 expect: tuple[int, int, int, int] | None = None) -> None:
        super().__init__(int(dset.shape[0]), int(dset.shape[1]), dtype, scale)
        self._file, self._dset = file, dset
        self._fd: int | None = os.open(file.filename, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.watches = [FileWatch(file.filename, self._fd, 0, expect)]
        except BaseException:
            os.close(self._fd)
            raise

    def read(self, rows: np.ndarray, out: np.ndarray, key: Hashable = None) -> np.ndarray:
        self.check()
        self._read(rows, out)
        self.check(path=False)
        return out

    def _read(self, rows: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        super().close()
        if self._file is not None and self._file.id.valid:
            self._file.close()
        self._file = self._dset = None  # type: ignore[assignment]
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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

    def _read(self, rows: np.ndarray, out: np.ndarray) -> None:
        uniq, inverse = np.unique(rows, return_inverse=True)
        stage = self._staging(len(uniq))
        if len(uniq):
            self._dset.read_direct(stage, source_sel=np.s_[uniq], dest_sel=np.s_[0:len(uniq)])
        self._finish(stage, inverse, out)


class ChunkReader(_H5Reader):
    """Chunked (maybe compressed): whole chunk bands, one h5py call each, in a small LRU."""

    mode = "chunks"

    def __init__(self, file: h5py.File, dset: h5py.Dataset, dtype: np.dtype, scale: float,
                 cached_bands: int, expect: tuple[int, int, int, int] | None = None) -> None:
        super().__init__(file, dset, dtype, scale, expect)
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

    def _read(self, rows: np.ndarray, out: np.ndarray) -> None:
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

    def close(self) -> None:
        self._bands.clear()
        super().close()

