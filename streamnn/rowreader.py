"""Read given rows of a store split, normalized to float32, into a caller's buffer.

This is the loader's I/O layer: ``reader.read(rows, out)`` fills ``out`` (b, D) float32 with
the stored rows ``rows`` (any order, repeats allowed) converted to normalized units
(``stored * scale``), whole batches at a time. Three strategies, chosen per dataset when the
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
``hdf5``    (contiguous but not mappable: non-native byte order, a non-default driver)
    Sorted unique rows read with one h5py call per batch (a point-union selection), then
    put back in batch order.
``chunks``  (chunked datasets, compressed or not)
    Rows are grouped by chunk band (``chunks[0]`` rows); each needed band is read whole with
    one h5py call (decompressed once) into a small LRU of bands, and rows are copied out of
    it. With the loader's ``order="block"`` (blocks = chunk bands) every band is read once
    per epoch; with the exact random order a batch touches ~one band per row, which is
    correct but slow for compressed stores (decompress a whole chunk per row).

Readers are not thread-safe; the loader uses each one from a single thread. They hold no
state that matters across ``fork``: the loader drops its reader in a child and opens another.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

from .errors import StreamnnError
from .store import DTYPES, FORMAT

#: Row bands (chunks) kept decompressed by the ``chunks`` strategy, at least.
MIN_CACHED_BANDS = 4


class RowReader:
    """Base class: ``read(rows, out)`` fills ``out[i]`` with normalized row ``rows[i]``."""

    mode = "?"
    #: True when :meth:`read` runs without the GIL and without h5py's lock (safe and useful
    #: to run in a prefetch thread).
    releases_gil = False

    def __init__(self, n_rows: int, n_features: int, dtype: np.dtype, scale: float) -> None:
        self.n_rows, self.n_features = n_rows, n_features
        self.dtype = np.dtype(dtype)
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

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

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

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
        if self._direct:
            np.take(self._map, rows, axis=0, out=out)
        else:
            stage = self._staging(len(rows))
            np.take(self._map, rows, axis=0, out=stage)
            self._convert(stage, out)

    def row(self, i: int) -> np.ndarray:
        return self._map[i]

    def close(self) -> None:
        super().close()
        self._map = None  # type: ignore[assignment]  # unmapped when the last view goes


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

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
        uniq, inverse = np.unique(rows, return_inverse=True)
        stage = self._staging(len(uniq))
        if len(uniq):
            self._dset.read_direct(stage, source_sel=np.s_[uniq], dest_sel=np.s_[0:len(uniq)])
        self._finish(stage, inverse, out)


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

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
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


def open_rows(path: str | os.PathLike, split: str, *, fingerprint: str | None = None,
              cached_bands: int = MIN_CACHED_BANDS, allow_memmap: bool = True) -> RowReader:
    """Open the row reader for ``split`` of the store at ``path`` (the best strategy it allows).

    ``fingerprint``: the content identity the caller validated earlier; a store replaced since
    then is a one-line error, not silently different data.
    """
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
            from .shards import open_segments

            try:
                return open_segments(f, Path(path), split, cached_bands=cached_bands, allow_memmap=allow_memmap)
            finally:
                f.close()
        stored = str(attrs["dtype"].decode() if isinstance(attrs["dtype"], bytes) else attrs["dtype"])
        dtype = np.dtype(DTYPES[stored])
        scale = float(attrs["scale"])
        n, d = (int(s) for s in dset.shape)
        if dset.chunks is not None:
            return ChunkReader(f, dset, dtype, scale, cached_bands)
        offset = dset.id.get_offset()
        mappable = (allow_memmap and n > 0 and offset is not None and dset.dtype == dtype
                    and dset.dtype.isnative and f.driver == "sec2" and f.userblock_size == 0
                    and offset + n * d * dtype.itemsize <= os.path.getsize(path))
        if mappable:
            reader = MemmapReader(path, int(offset), n, d, dtype, scale)
            if _same_row(reader, dset, 0) and _same_row(reader, dset, n - 1):
                f.close()
                return reader
            reader.close()
        return Hdf5Reader(f, dset, dtype, scale)
    except BaseException:
        if f.id.valid:
            f.close()
        raise


def _same_row(reader: MemmapReader, dset: h5py.Dataset, i: int) -> bool:
    return bool(np.array_equal(reader.row(i), dset[i], equal_nan=reader.dtype.kind == "f"))
