"""Read given rows of a store split, normalized to float32, into a caller's buffer.

This is the loader's I/O layer: ``reader.read(rows, out)`` fills ``out`` (b, D) float32 with
the stored rows ``rows`` (any order, repeats allowed) converted to normalized units
(``stored * scale``), whole batches at a time (:class:`~.base.RowReader`). Four strategies,
chosen per dataset by :func:`open_rows` when the reader is opened (lazily, in the process that
reads): ``memmap`` (:mod:`.mmap`) and ``pread`` (:mod:`.pread`) for the default layout
(uncompressed contiguous X), ``hdf5`` and ``chunks`` (:mod:`.hdf5`) for the others; a sharded
store's split is read through its shards (:mod:`.segments`).

Choice between ``memmap`` and ``pread`` (``reader="auto"``): ``pread`` when the split's X is
larger than ``FIT_FRACTION`` (1/2) of the memory available to the page cache (``MemAvailable``
of ``/proc/meminfo``, capped by the cgroup's ``memory.max``), ``memmap`` otherwise. The cost
of a wrong guess is asymmetric: a map over a store that does not stay cached reads ~60x the
bytes it delivers (40x slower measured), while ``pread`` over a cached store stays a copy from
the cache (0.55-0.85x the map's speed measured), hence the margin.
``reader="mmap"`` / ``"pread"`` force one (chunked stores are always read by chunks).

Readers are not thread-safe; the loader uses each one from a single thread. They hold no
state that matters across ``fork``: the loader drops its reader in a child and opens another
(the pread pool is created lazily in the reading process; a fork does not copy its threads).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from streamnn.data.readers.base import AHEAD_BATCHES, FileWatch, RowReader, identity
from streamnn.data.readers.hdf5 import MIN_CACHED_BANDS, ChunkReader, Hdf5Reader
from streamnn.data.readers.mmap import MemmapReader
from streamnn.data.readers.pread import AHEAD_BYTES, AHEAD_ROWS, MAX_RUN_BYTES, PREAD_THREADS, TASK_BYTES, PreadReader
from streamnn.data.readers.segments import SegmentReader, joined
from streamnn.data.remote import is_url
from streamnn.data.format import STORE_DTYPES, check_index, checked_split, segments, shard_records
from streamnn.errors import StreamnnError
from streamnn.paths import path_text

__all__ = ["FileWatch", "READERS", "FIT_FRACTION", "MIN_CACHED_BANDS", "PREAD_THREADS", "AHEAD_BYTES", "AHEAD_ROWS",
           "AHEAD_BATCHES", "MAX_RUN_BYTES", "TASK_BYTES", "RowReader", "MemmapReader", "PreadReader",
           "Hdf5Reader", "ChunkReader", "SegmentReader", "open_rows", "open_segments", "available_memory",
           "fits_in_memory"]

#: Reader choices of :func:`open_rows` (and ``Loader(reader=...)``, ``streamnn-train --reader``).
READERS = ("auto", "mmap", "pread")
#: ``reader="auto"`` reads with ``pread`` when X is larger than this fraction of the memory available.
FIT_FRACTION = 0.5


def open_rows(path: str | os.PathLike, split: str, *, fingerprint: str | None = None,
              cached_bands: int = MIN_CACHED_BANDS, allow_memmap: bool = True, reader: str = "auto",
              threads: int | None = None) -> RowReader:
    """Open the row reader for ``split`` of the store at ``path`` (the best strategy it allows).

    ``fingerprint``: the content identity the caller validated earlier; a store replaced since
    then is a one-line error, not silently different data. ``reader``: "auto" (see the module
    docstring), "mmap" or "pread" for the default (contiguous) layout.
    """
    if reader not in READERS:
        raise StreamnnError(f"unknown reader {reader!r} (choose {', '.join(READERS)})")
    if is_url(path):  # read by byte range over the network (docs/remote.md)
        from streamnn.data.remote.reader import open_remote_rows
        return open_remote_rows(str(path), split, fingerprint=fingerprint)
    path = os.fspath(Path(path))
    try:
        f = h5py.File(path, "r", rdcc_nbytes=0)
    except OSError as exc:
        raise StreamnnError(f"cannot open the store ({exc.__class__.__name__}: {exc})", path) from None
    try:
        attrs = f.attrs
        dset = checked_split(f, split, fingerprint, path)
        if dset.is_virtual:  # a sharded store's index: read the shards themselves
            try:
                return open_segments(f, Path(path), split, reader=reader, cached_bands=cached_bands,
                                     allow_memmap=allow_memmap, threads=threads)
            finally:
                f.close()
        stored = str(attrs["dtype"].decode() if isinstance(attrs["dtype"], bytes) else attrs["dtype"])
        dtype = np.dtype(STORE_DTYPES[stored])
        scale = float(attrs["scale"])
        n, d = (int(s) for s in dset.shape)
        # The file as h5py opened it: a reader's own descriptor must be that same file.
        expect = identity(os.fstat(f.id.get_vfd_handle())) if f.driver == "sec2" else None
        if dset.chunks is not None:
            return ChunkReader(f, dset, dtype, scale, cached_bands, expect)
        offset = dset.id.get_offset()
        nbytes = n * d * dtype.itemsize
        plain = (allow_memmap and n > 0 and offset is not None and dset.dtype == dtype
                 and dset.dtype.isnative and f.driver == "sec2" and f.userblock_size == 0
                 and offset + nbytes <= os.path.getsize(path))
        if plain:
            pread = reader == "pread" or (reader == "auto" and not fits_in_memory(nbytes))
            raw: RowReader = (PreadReader(path, int(offset), n, d, dtype, scale, threads or PREAD_THREADS,
                                          expect=[expect]) if pread
                              else MemmapReader(path, int(offset), n, d, dtype, scale, expect))
            if _same_row(raw, dset, 0) and _same_row(raw, dset, n - 1):
                f.close()
                return raw
            raw.close()
        return Hdf5Reader(f, dset, dtype, scale, expect)
    except BaseException:
        if f.id.valid:
            f.close()
        raise


def available_memory() -> int | None:
    """Bytes the page cache may use: ``MemAvailable``, capped by the cgroup (v2) ``memory.max``."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:
        with open("/proc/self/cgroup") as f:
            group = next(line.strip()[3:] for line in f if line.startswith("0::"))
        with open(f"/sys/fs/cgroup{group}/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            avail = min(avail, int(limit))
    except (OSError, StopIteration):
        pass
    return avail


def fits_in_memory(nbytes: int) -> bool:
    """Whether ``nbytes`` of store stay cached: at most ``FIT_FRACTION`` of the memory available
    (unknown memory, e.g. not Linux: assume it fits, the map is then the reader)."""
    avail = available_memory()
    return avail is None or nbytes <= FIT_FRACTION * avail


def _same_row(reader: MemmapReader | PreadReader, dset: h5py.Dataset, i: int) -> bool:
    return bool(np.array_equal(reader.row(i), dset[i], equal_nan=reader.dtype.kind == "f"))

def open_segments(f: h5py.File, index: Path, split: str, *, reader: str = "auto", **kwargs: Any) -> RowReader:
    """The row reader of a sharded store's split: each shard's opened by :func:`open_rows`
    (``kwargs``); ``reader="auto"`` chooses memory maps or ``pread`` by the size of the whole
    split, as for one file."""
    check_index(f, index, f.attrs["shards"])
    records = {r["file"]: r for r in shard_records(f.attrs["shards"], index)}
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
        return joined(readers)
    except BaseException:
        for part in readers:
            part.close()
        raise
