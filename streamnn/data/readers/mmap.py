"""``memmap``: the store's X mapped read-only, a batch one gather (uncompressed contiguous X:
the default store layout).

The dataset's bytes are mapped read-only (``np.memmap`` at ``dset.id.get_offset()``) and a
batch is one ``np.take(map, rows, axis=0, out=...)`` gather; float16 / uint8 rows are gathered
into a small staging buffer and scaled into ``out`` in one pass. No HDF5 call at all after
opening (the h5py file is closed once the map exists), so nothing holds h5py's global lock and
the gather releases the GIL: a prefetch thread overlaps it with the caller's BLAS work. Mapped
file pages belong to the OS page cache (RssFile, shared, reclaimable), not to the process's
private memory. The map is checked against h5py on the first and last row when opened.
"""
from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from streamnn.data.readers.base import RowReader


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

