"""``memmap``: the store's X mapped read-only, a batch one gather (uncompressed contiguous X:
the default store layout).

The dataset's bytes are mapped read-only (``np.memmap`` at ``dset.id.get_offset()``) and a
batch is one ``np.take(map, rows, axis=0, out=...)`` gather, float16 / uint8 rows into a small
staging buffer, then cast into ``out`` and scaled there; rows of ``ROW_COPY_BYTES`` or more are
copied (cast) one assignment each straight into ``out``, then scaled. No HDF5 call at all after
opening (the h5py file is closed once the map exists), so nothing holds h5py's global lock and
the gather releases the GIL: a prefetch thread overlaps it with the caller's BLAS work. Mapped
file pages belong to the OS page cache (RssFile, shared, reclaimable), not to the process's
private memory. The map is checked against h5py on the first and last row when opened.

A mapped file that shrinks under the map turns a read of the lost pages into SIGBUS, which kills
the process (no Python code can catch it). So each batch starts with a check of the file
(:class:`~.base.FileWatch`: fstat of the mapped descriptor, stat of the path: truncated,
rewritten, replaced) and ends with another fstat (rewritten during the gather): a changed store
is a one-line error, not a signal death or other pixels. Residual race: a truncation in the
microseconds between the check and the gather still ends the process by SIGBUS.
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Hashable

import numpy as np

from streamnn.data.readers.base import FileWatch, RowReader

#: Rows of at least this many bytes are gathered one assignment per row, cast on the way (NumPy's
#: copy loops), smaller ones by one ``np.take`` (into a staging buffer, then cast): ``np.take``
#: copies each row with ``memmove``, 1.6x slower for 48 KiB float32 rows, and the staging pass
#: cost 1.1x for 12 KiB uint8 rows (``tools/bench_loader.py --bound``, AMD EPYC).
ROW_COPY_BYTES = 8 << 10


class MemmapReader(RowReader):
    mode = "memmap"
    releases_gil = True

    def __init__(self, path: str, offset: int, n_rows: int, n_features: int, dtype: np.dtype,
                 scale: float, expect: tuple[int, int, int, int] | None = None) -> None:
        super().__init__(n_rows, n_features, dtype, scale)
        self.path = path
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            end = offset + n_rows * self.row_bytes
            self.watches = [FileWatch(path, fd, end, expect)]
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            self._mmap = mmap.mmap(fd, end - start, access=mmap.ACCESS_READ, offset=start)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # A plain ndarray over the map, read-only.
        self._map = np.frombuffer(self._mmap, self.dtype, n_rows * n_features,
                                  offset - start).reshape(n_rows, n_features)

    def read(self, rows: np.ndarray, out: np.ndarray, key: Hashable = None) -> np.ndarray:
        self.check()  # before the gather: a truncated file would be a SIGBUS
        if self.row_bytes >= ROW_COPY_BYTES:  # each row copied (cast) straight into out
            for i, r in enumerate(rows.tolist()):
                out[i] = self._map[r]
            self._scale(out)
        elif self._direct:
            np.take(self._map, rows, axis=0, out=out)
        else:
            stage = self._staging(len(rows))
            np.take(self._map, rows, axis=0, out=stage)
            self._convert(stage, out)
        self.check(path=False)  # rewritten during the gather
        return out

    def row(self, i: int) -> np.ndarray:
        return self._map[i]

    @property
    def array(self) -> np.ndarray:
        """The mapped rows (N, D), read-only."""
        return self._map

    def close(self) -> None:
        super().close()
        self._map = self._mmap = None  # type: ignore[assignment]  # unmapped when the last view goes
        if self._fd is not None:
            os.close(self._fd)  # the map does not need it
            self._fd = None

