"""A sharded store's split read as one: a row reader per shard (segment), gathered into one batch.

A virtual dataset has no file offset (it cannot be memory-mapped) and h5py reads through it
slowly, so a split of a sharded store (docs/format.md) is seen as a list of
segments (shard file, rows): each shard's X is opened with the best one-file strategy
(:func:`~streamnn.data.readers.open_rows`: a memory map for contiguous X) and a batch is
gathered segment by segment; shards read with ``pread`` become one
:class:`~streamnn.data.readers.pread.PreadReader` over all the files (:func:`joined`).
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from streamnn.data.readers.base import RowReader
from streamnn.data.readers.mmap import MemmapReader
from streamnn.data.readers.pread import PreadReader


class SegmentReader(RowReader):
    """Rows of a split spread over segments (one row reader per shard), read as one.

    Memory-mapped segments (the default) are copied row by row straight from the maps into
    ``out``, cast to float32 on the way, then scaled in place (uint8), as the one-file gather
    does rows of :data:`~streamnn.data.readers.mmap.ROW_COPY_BYTES` or more; rows of a few KB
    copy about as fast this way as with one ``np.take`` (``tools/bench_shards.py``).
    (Shards read with ``pread`` are one :class:`~streamnn.data.readers.pread.PreadReader` over all the
    files, not a SegmentReader.) Other segments (``chunks``, ``hdf5``) read their share of
    the batch into a float32 staging buffer, which is then put in batch order; batches
    announced ahead (:meth:`expect`) are announced to each segment for its rows.
    """

    def __init__(self, readers: Sequence[RowReader]) -> None:
        first = readers[0]
        super().__init__(sum(r.n_rows for r in readers), first.n_features, first.dtype, first.scale)
        self.readers = list(readers)
        self.mode = "segments:" + first.mode
        self.releases_gil = all(r.releases_gil for r in readers)
        self.reads_ahead = any(r.reads_ahead for r in readers)
        self.ahead_rows = max(r.ahead_rows for r in readers)
        for r in readers:
            r.lend = 0  # what a segment returns is copied at once
        self._starts = np.cumsum([0] + [r.n_rows for r in readers])
        self._maps = ([r.array for r in readers] if all(isinstance(r, MemmapReader) for r in readers)
                      else None)
        self.watches = [w for r in readers for w in r.watches]  # every shard's file
        self._float: np.ndarray | None = None

    def _segments(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._starts, rows, side="right") - 1

    def expect(self, key: Hashable, rows: np.ndarray) -> None:
        seg = self._segments(rows)
        for s, reader in enumerate(self.readers):
            if reader.reads_ahead:
                reader.expect(key, rows[seg == s] - self._starts[s])

    def forget(self) -> None:
        for reader in self.readers:
            reader.forget()

    def read(self, rows: np.ndarray, out: np.ndarray, key: Hashable = None) -> np.ndarray:
        seg = self._segments(rows)
        if self._maps is not None:
            self.check()  # before the gather: a truncated shard would be a SIGBUS (see .mmap)
            maps = self._maps
            for j, (s, r) in enumerate(zip(seg.tolist(), (rows - self._starts[seg]).tolist())):
                out[j] = maps[s][r]  # one copy (a cast) per row, straight from the map
            self._scale(out)
            self.check(path=False)
            return out
        order = np.argsort(seg, kind="stable")
        bounds = np.searchsorted(seg[order], np.arange(len(self.readers) + 1))
        if self._float is None or self._float.shape[0] < len(rows):
            self._float = np.empty((max(len(rows), 1), self.n_features), np.float32)
        stage = self._float[:len(rows)]
        for s, reader in enumerate(self.readers):
            lo, hi = int(bounds[s]), int(bounds[s + 1])
            if hi > lo:
                view = stage[lo:hi]
                got = reader.read(rows[order[lo:hi]] - self._starts[s], view, key=key)
                if not np.may_share_memory(got, view):  # the segment lent its own buffer
                    view[...] = got
        out[order] = stage
        return out

    def close(self) -> None:
        super().close()
        for reader in self.readers:
            reader.close()
        self._maps = self._float = None


def joined(readers: Sequence[RowReader]) -> RowReader:
    """One reader over the segments ``readers`` (in row order), which it takes over: a
    :class:`PreadReader` over all the files when every segment is read with ``pread``, a
    :class:`SegmentReader` otherwise."""
    if all(isinstance(part, PreadReader) for part in readers):
        first = readers[0]
        combined = PreadReader(first.path, 0, 0, first.n_features, first.dtype, first.scale, first.threads,
                               segments=[(part.path, part.offsets[0], part.n_rows) for part in readers],
                               expect=[part.watches[0].identity for part in readers])
        for part in readers:
            part.close()
        return combined
    return SegmentReader(readers)
