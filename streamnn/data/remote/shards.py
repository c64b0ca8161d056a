"""A sharded store read by the URL of its index, as the one-file store it stands for.

The index's virtual datasets cannot be read over a network (HDF5 would open their source files
itself, on the local disk), so the index is opened as a *view*: an HDF5 file built in memory
with the index's attributes (but its ``shards`` records), ``stats`` and ``skipped``, and for each
split ``y`` and ``paths`` read from the shards and ``X`` as a contiguous dataset whose bytes are
never written: its byte range stands for the shards' rows. :class:`ViewObject` serves the view
by byte range like a remote object: the metadata from memory, a range of X from the shard that
holds those rows (each shard a :class:`~.objects.RemoteObject`, checked and cached as one), so
the Store API, the remote reader and the local cache work on it unchanged.

Shards are resolved relative to the index's URL (``OUT.h5.shards/part-<r>-of-<K>.h5`` beside
``OUT.h5``) and checked on open as a local sharded store's are (docs/format.md): each one's
size, content fingerprint and metadata digest must be what the index records.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import h5py
import numpy as np

from streamnn.data.format import STRING_DTYPE, as_text, metadata_digest, shard_records
from streamnn.data.remote import open_object
from streamnn.data.remote.objects import REUSE_SECONDS, Version
from streamnn.errors import StreamnnError

#: Shards opened (and checked) at once.
OPEN_THREADS = 16
_PAGE = 1 << 16
_VIEWS: dict[str, tuple[tuple, float, bytes, list]] = {}


class _Image(io.RawIOBase):
    """A sparse in-memory file for h5py to write the view into (pages only where written)."""

    def __init__(self) -> None:
        super().__init__()
        self.pages: dict[int, bytearray] = {}
        self.pos = self.size = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def truncate(self, size: int | None = None) -> int:
        self.size = self.pos if size is None else size
        return self.size

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        at = 0
        while at < len(view):
            page, lo = divmod(self.pos + at, _PAGE)
            take = min(_PAGE - lo, len(view) - at)
            self.pages.setdefault(page, bytearray(_PAGE))[lo:lo + take] = view[at:at + take]
            at += take
        self.pos += len(view)
        self.size = max(self.size, self.pos)
        return len(view)

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = max(0, min(len(view), self.size - self.pos))
        self.copy(self.pos, view[:n])
        self.pos += n
        return n

    def copy(self, offset: int, view: memoryview) -> None:
        at = 0
        while at < len(view):
            page, lo = divmod(offset + at, _PAGE)
            take = min(_PAGE - lo, len(view) - at)
            got = self.pages.get(page)
            view[at:at + take] = got[lo:lo + take] if got is not None else bytes(take)
            at += take


class ViewObject:
    """The view's bytes by range, as a remote object gives them (``read_into``)."""

    def __init__(self, url: str, image: _Image, regions: list[tuple[int, int, Any, int]], index: Any,
                 shards: list[Any], nbytes: int, version: Version) -> None:
        self.url, self.policy, self.head = url, index.policy, b""
        self.image, self.index, self.shards = image, index, shards
        self.regions = sorted(regions, key=lambda r: r[0])  # (start, length, object, offset there)
        self._starts = [r[0] for r in self.regions]
        self.version = version._replace(size=max(image.size, nbytes))

    @property
    def multi(self) -> bool | None:
        """False once a shard's server refused several ranges in one request."""
        return None if all(o.multi is not False for o in self.shards) else False

    @property
    def requests(self) -> int:
        return sum(o.requests for o in [self.index, *self.shards])

    def read_into(self, offset: int, bufs: Any) -> None:
        self.read_many([(offset, [memoryview(b).cast("B") for b in bufs])])

    def read_many(self, ranges: Any) -> None:
        """The ranges' bytes: the view's metadata from memory, X's from the shards (each
        shard's pieces in one :meth:`~.objects.RemoteObject.read_many`)."""
        pieces: dict[int, tuple[Any, list]] = {}
        for offset, sinks in ranges:
            for sink in sinks:
                self._map(offset, sink, pieces)
                offset += len(sink)
        for obj, todo in pieces.values():
            obj.read_many(todo)

    def _map(self, offset: int, sink: memoryview, pieces: dict[int, tuple[Any, list]]) -> None:
        at = 0
        while at < len(sink):
            pos = offset + at
            i = bisect.bisect_right(self._starts, pos) - 1
            start, length, obj, there = self.regions[i] if i >= 0 else (0, 0, None, 0)
            if start <= pos < start + length:
                take = min(len(sink) - at, start + length - pos)
                pieces.setdefault(id(obj), (obj, []))[1].append((there + pos - start, [sink[at:at + take]]))
            else:
                nxt = self._starts[i + 1] if i + 1 < len(self._starts) else offset + len(sink)
                take = min(len(sink) - at, max(nxt - pos, 1))
                self.image.copy(pos, sink[at:at + take])
            at += take

    def close(self) -> None:
        for obj in [self.index, *self.shards]:
            obj.close()


def shard_url(index_url: str, name: str) -> str:
    """The URL of shard ``name`` (a plain relative path) beside the index at ``index_url``."""
    return index_url.rsplit("/", 1)[0] + "/" + name


def open_sharded(f: h5py.File, url: str, open_one: Callable[[str, Any], h5py.File]) -> h5py.File:
    """The view of the sharded store whose index ``f`` (opened over its URL ``url``) is: an
    h5py file read through a :class:`ViewObject`. ``f`` is closed. ``open_one(url, object)``:
    h5py's file over an object (:func:`.rangefile.open_one`)."""
    index = f._streamnn_source.obj
    shards: list[Any] = []
    try:
        if "?" in url or "#" in url:
            raise StreamnnError("a sharded store's URL cannot have a query or a fragment (its shards' URLs "
                                "are made from it)", url)
        records = shard_records(f.attrs["shards"], url)  # type: ignore[arg-type]
        with ThreadPoolExecutor(min(OPEN_THREADS, max(1, len(records)))) as pool:
            shards = list(pool.map(lambda r: open_object(shard_url(url, r["file"]), index.policy, reuse=True), records))
        key = (index.version, tuple(s.version for s in shards))
        kept = _VIEWS.get(url)
        if kept is not None and kept[0] == key and time.monotonic() - kept[1] < REUSE_SECONDS:
            image, layout = kept[2], kept[3]
        else:
            image, layout = _build(f, url, records, shards, open_one)
            _VIEWS.clear()
            _VIEWS[url] = (key, time.monotonic(), image, layout)
        regions = [(start, length, shards[s], there) for start, length, s, there in layout]
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:32]
        nbytes = index.version.size + sum(s.version.size for s in shards)
        view = ViewObject(url, image, regions, index, shards, nbytes, Version(0, f'"{digest}"', None))
    except BaseException:
        for obj in shards:
            obj.close()
        f.close()
        index.close()
        raise
    f.close()
    try:
        return open_one(url, view)
    except BaseException:
        view.close()
        raise


def _build(f: h5py.File, url: str, records: list[dict[str, Any]], shards: list[Any],
           open_one: Callable[[str, Any], h5py.File]) -> tuple[_Image, list]:
    """Check the shards against the index's records and write the view; returns its image and
    the layout of its X ranges: (start in the view, length, shard number, offset in the shard)."""
    files = {r["file"]: i for i, r in enumerate(records)}

    def opened(i: int) -> h5py.File:
        record, obj = records[i], shards[i]
        if obj.version.size != record["size"]:
            raise StreamnnError(f"shard {record['file']} was altered (size {obj.version.size} bytes, the index "
                                f"recorded {record['size']})", url)
        try:
            h5 = open_one(obj.url, obj)
            actual = {"file": record["file"], "size": obj.version.size,
                      "fingerprint": as_text(h5.attrs["fingerprint"]), "metadata_sha256": metadata_digest(h5)}
        except (OSError, KeyError):
            raise StreamnnError(f"shard {record['file']} is not a readable store", url) from None
        if actual != record or "shards" in h5.attrs:
            h5.close()
            raise StreamnnError(f"shard {record['file']} was altered (its fingerprint or metadata differ from "
                                f"what the index recorded)", url)
        return h5

    with ThreadPoolExecutor(min(OPEN_THREADS, max(1, len(records)))) as pool:
        parts = list(pool.map(opened, range(len(records))))
    image, layout = _Image(), []
    try:
        with h5py.File(image, "w") as out:
            for name, value in f.attrs.items():
                if name != "shards":
                    out.attrs[name] = value
            for name, item in f.items():
                if name in ("stats", "skipped") or not isinstance(item, h5py.Group) or "X" not in item:
                    f.copy(item, out, name)
                    continue
                layout += _split(out.create_group(name), item, name, url, files, parts)
    finally:
        for h5 in parts:
            h5.close()
    return image, layout


def _split(g: h5py.Group, item: h5py.Group, name: str, url: str, files: dict[str, int],
           parts: list[h5py.File]) -> list[tuple[int, int, int, int]]:
    """Split ``name`` of the view: y and paths from the shards, X standing for their rows."""
    X = item["X"]
    segments, start = [], 0
    for source in X.virtual_sources() if X.is_virtual else ():
        lo, hi = source.vspace.get_select_bounds()
        s = files.get(source.file_name)
        if s is None or lo[0] != start or source.dset_name != f"{name}/X":
            raise StreamnnError(f"split {name!r}: virtual X is not a sequence of whole recorded shards", url)
        rows = hi[0] - lo[0] + 1
        part = parts[s][name]["X"]
        if part.shape[0] != rows or part.shape[1:] != X.shape[1:] or part.dtype != X.dtype:
            raise StreamnnError(f"split {name!r}: shard {source.file_name} holds {part.shape[0]} rows, the index "
                                f"{rows}", url)
        if part.chunks is not None or part.id.get_offset() is None or not part.dtype.isnative:
            raise StreamnnError(f"split {name!r} is chunked or compressed: only the default layout (uncompressed, "
                                f"contiguous) is streamed from a URL; repack without --compression", url)
        segments.append((s, rows, int(part.id.get_offset())))
        start += rows
    if start != X.shape[0]:
        raise StreamnnError(f"split {name!r}: the shards hold {start} rows, X has {X.shape[0]}", url)
    g.create_dataset("y", data=np.concatenate([np.empty(0, np.int32)] + [parts[s][name]["y"][:] for s, _, _ in segments])
                     .astype(np.int32))
    g.create_dataset("paths", data=np.concatenate([np.empty(0, object)] + [parts[s][name]["paths"][:] for s, _, _ in segments]),
                     dtype=STRING_DTYPE)
    if not start:
        g.create_dataset("X", shape=X.shape, dtype=X.dtype)
        return []
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # X's bytes are the shards': never written here
    space = h5py.h5s.create_simple(tuple(X.shape))
    dsid = h5py.h5d.create(g.id, b"X", h5py.h5t.py_create(X.dtype), space, dcpl=dcpl)
    offset, row_bytes = int(dsid.get_offset()), int(np.prod(X.shape[1:])) * X.dtype.itemsize
    dsid.close()
    out, at = [], offset
    for s, rows, there in segments:
        out.append((at, rows * row_bytes, s, there))
        at += rows * row_bytes
    return out
