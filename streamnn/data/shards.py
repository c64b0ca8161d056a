"""Sharded stores: one logical store over several files (the index and its shards).

*Layout.* ``OUT.h5`` is the *index*; its shards are ``OUT.shards/part-<r>-of-<K>.h5``. Each
shard is itself a complete streamnn store (same attributes and options, plus
``options.shard = [r, K]``) holding rank r's share of every split: rows
``[floor(r n / K), floor((r + 1) n / K))`` of the split's row order (the one-file store's
order, drawn from the seed), minus the files that failed to decode. The index has the
one-file store's attributes, class names, counts, skipped files, statistics and fingerprint;
its ``/<split>/X``, ``y`` and ``paths`` are HDF5 virtual datasets over the shards' datasets,
in rank order, with source paths relative to the index's folder (the pair can be moved or
copied together), so h5py or HDFView users see one store. Whatever K, the index holds
exactly the rows, labels, order, statistics and fingerprint of the one-file store: the rows
are the same and in the same order, the statistics come from exact integer sums
(:class:`~streamnn.pack.job.RunningMoments`, summed across ranks by an integer reduction), and
the fingerprint is computed over the labels and paths read through the virtual datasets.

*Integrity.* HDF5 reads the fill value (zeros) where a virtual dataset's source file is
missing, silently. So the index records, in its root attribute ``shards`` (JSON), each
shard's file name, size, own fingerprint and a digest of its metadata (root attributes and
dataset shapes, :func:`metadata_digest`); :func:`check_index` (run by every
:class:`~streamnn.data.store.Store` open and by every row reader open) stops with a one-line
error naming the shard that is missing, altered or not recorded. ``Store.verify`` also
verifies every shard's own fingerprint.

*Reading.* A virtual dataset has no file offset (it cannot be memory-mapped) and h5py reads
through it slowly, so :class:`SegmentReader` sees a split as a list of segments (shard
file, rows): each shard's X is opened with the best one-file strategy
(:func:`~streamnn.data.readers.open_rows`: a memory map for contiguous X) and a batch is
gathered segment by segment into a staging buffer, then put in batch order.

"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from streamnn.data.readers import MemmapReader, PreadReader, RowReader, fits_in_memory, open_rows
from streamnn.errors import StreamnnError
from streamnn.paths import path_text

FOLDER_SUFFIX = ".shards"
_PART = re.compile(r"part-(\d+)-of-(\d+)\.h5")


def shard_folder(index: str | os.PathLike) -> Path:
    """``OUT.shards`` beside the index ``OUT.h5``."""
    index = Path(index)
    return index.with_name(index.stem + FOLDER_SUFFIX)


def part_name(rank: int, size: int) -> str:
    return f"part-{rank}-of-{size}.h5"


# -- integrity -----------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def metadata_digest(f: h5py.File) -> str:
    """sha256 of a store file's root attributes and the shapes of its split datasets."""
    shapes: dict[str, Any] = {}
    f.visititems(lambda name, obj: shapes.__setitem__(name, list(obj.shape)) if isinstance(obj, h5py.Dataset)
                 else None)
    meta = {"attrs": {k: _plain(v) for k, v in f.attrs.items()}, "shapes": shapes}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode("utf-8", "surrogateescape")).hexdigest()


def shard_record(path: Path, relative: str) -> dict[str, Any]:
    """What the index records about a shard: file (relative), size, fingerprint, metadata digest."""
    with h5py.File(path, "r") as f:
        fp, digest = _plain(f.attrs["fingerprint"]), metadata_digest(f)
    return {"file": relative, "size": path.stat().st_size, "fingerprint": fp, "metadata_sha256": digest}


def check_index(f: h5py.File, index: Path, records_json: Any) -> list[Path]:
    """Check every shard an index records (exists, same size, fingerprint and metadata digest)
    and that its virtual datasets read nothing else; return the shard paths."""
    try:
        records = json.loads(_plain(records_json))
        files = [str(r["file"]) for r in records]
    except (ValueError, TypeError, KeyError):
        raise StreamnnError("the index's 'shards' attribute is unreadable", path_text(index)) from None
    folder = index.parent
    paths = []
    for record in records:
        path = folder / record["file"]
        if not path.is_file():
            raise StreamnnError(f"shard {record['file']} is missing (the store is incomplete)", path_text(index))
        size = path.stat().st_size
        if size != record["size"]:
            raise StreamnnError(f"shard {record['file']} was altered (size {size} bytes, the index "
                                f"recorded {record['size']})", path_text(index))
        try:
            actual = shard_record(path, record["file"])
        except (OSError, KeyError):
            raise StreamnnError(f"shard {record['file']} is not a readable store", path_text(index)) from None
        if actual != record:
            raise StreamnnError(f"shard {record['file']} was altered (its fingerprint or metadata "
                                f"differ from what the index recorded)", path_text(index))
        paths.append(path)

    def sources(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            for source in obj.virtual_sources():
                if source.file_name not in files:
                    raise StreamnnError(f"dataset {name} reads {source.file_name}, which is not a "
                                        f"recorded shard", path_text(index))

    f.visititems(sources)
    return paths


# -- reading ---------------------------------------------------------------------------------------
def segments(f: h5py.File, index: Path, split: str) -> list[tuple[Path, int]]:
    """A virtual split's X as (shard file, rows) in row order (the readers check that each
    source is the whole of the shard's X)."""
    dset, out, start = f[split]["X"], [], 0
    for source in dset.virtual_sources():
        lo, hi = source.vspace.get_select_bounds()
        rows = hi[0] - lo[0] + 1
        if lo[0] != start or source.dset_name != f"{split}/X":
            raise StreamnnError(f"split {split!r}: virtual X is not a sequence of whole shards", path_text(index))
        out.append((index.parent / source.file_name, rows))
        start += rows
    if start != dset.shape[0]:
        raise StreamnnError(f"split {split!r}: the shards hold {start} rows, X has {dset.shape[0]}", path_text(index))
    return out


class SegmentReader(RowReader):
    """Rows of a split spread over segments (one row reader per shard), read as one.

    Memory-mapped segments (the default) are copied row by row straight from the maps into
    ``out`` (float32), or into a staging buffer of the stored dtype converted in one pass
    (float16, uint8), as the one-file gather does; rows of a few KB copy about as fast this
    way as with one ``np.take`` (``tools/bench_shards.py``).
    (Shards read with ``pread`` are one :class:`~streamnn.data.readers.PreadReader` over all the
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
            maps, dest = self._maps, out if self._direct else self._staging(len(rows))
            for j, (s, r) in enumerate(zip(seg.tolist(), (rows - self._starts[seg]).tolist())):
                dest[j] = maps[s][r]  # one copy per row, straight from the map
            if not self._direct:
                self._convert(dest, out)
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


def open_segments(f: h5py.File, index: Path, split: str, *, reader: str = "auto", **kwargs: Any) -> RowReader:
    """The row reader of a sharded store's split: each shard's opened by
    :func:`~streamnn.data.readers.open_rows` (``kwargs``); ``reader="auto"`` chooses memory maps
    or ``pread`` by the size of the whole split, as for one file."""
    records = {r["file"]: r for r in json.loads(_plain(f.attrs["shards"]))}
    check_index(f, index, f.attrs["shards"])
    dset = f[split]["X"]
    if reader == "auto":
        reader = "mmap" if fits_in_memory(int(np.prod(dset.shape)) * dset.dtype.itemsize) else "pread"
    readers: list[RowReader] = []
    try:
        for path, rows in segments(f, index, split):
            record = records[path.relative_to(index.parent).as_posix()]
            part = open_rows(path, split, fingerprint=record["fingerprint"], reader=reader, **kwargs)
            readers.append(part)
            if part.n_rows != rows:
                raise StreamnnError(f"shard {record['file']} has {part.n_rows} rows of split {split!r}, "
                                    f"the index {rows}", path_text(index))
        if not readers:
            raise StreamnnError(f"split {split!r} has no shard", path_text(index))
        if all(isinstance(part, PreadReader) for part in readers):  # one pread reader over every file
            first = readers[0]
            combined = PreadReader(first.path, 0, 0, first.n_features, first.dtype, first.scale, first.threads,
                                   segments=[(part.path, part.offsets[0], part.n_rows) for part in readers])
            for part in readers:
                part.close()
            return combined
        return SegmentReader(readers)
    except BaseException:
        for part in readers:
            part.close()
        raise
