"""A remote object as a read-only file object for h5py (its ``fileobj`` driver), with a block cache.

h5py reads a store's metadata (superblock, object headers, attributes, labels) in many small
reads; over a network each would be a round trip. The file reads whole aligned ``BLOCK`` blocks,
a run of missing blocks in one ranged GET, and keeps the last ``CACHE_BYTES`` of them (LRU,
shared by the files of the process, by object version), so opening a store costs a handful of
requests (the first block comes with the request that opens the object), and opening it again
(the loader's reader) none. A read larger than a quarter of the cache goes straight to the
server. Every request is checked against the object's version (:mod:`.objects`).
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict

import h5py
import numpy as np

from streamnn.data.remote import open_object
from streamnn.data.remote.objects import RemoteObject
from streamnn.errors import StreamnnError

#: Bytes per cached block, and the cache's size (the process's, all object versions together).
BLOCK = 256 << 10
CACHE_BYTES = 64 << 20
_BLOCKS: OrderedDict[tuple, bytes] = OrderedDict()  # (url, version, block number) -> bytes
_LOCK = threading.Lock()


def _keep(key: tuple, block: bytes) -> None:
    with _LOCK:
        _BLOCKS[key] = block
        while len(_BLOCKS) * BLOCK > CACHE_BYTES:
            _BLOCKS.popitem(last=False)


class RangeFile(io.RawIOBase):
    """Read-only, seekable view of a :class:`RemoteObject` (not thread-safe: h5py serializes)."""

    def __init__(self, obj: RemoteObject) -> None:
        super().__init__()
        self.obj, self.size, self.pos = obj, obj.version.size, 0
        # Blocks are shared by the files of this process opened on the same version (the
        # Store's, then the reader's): the second open reads no metadata again.
        self._key = (obj.url, obj.version)
        if obj.head and len(obj.head) >= min(BLOCK, self.size):
            _keep((*self._key, 0), obj.head[:BLOCK])  # read by the request that opened the object
        tail = getattr(obj, "tail", None)
        if tail is not None:  # so were the last bytes: the whole blocks they hold
            at, data = tail
            for k in range(-(-at // BLOCK), -(-self.size // BLOCK)):
                _keep((*self._key, k), data[k * BLOCK - at:min((k + 1) * BLOCK, self.size) - at])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        n = max(0, min(len(view), self.size - self.pos))
        if n:
            self.pread(self.pos, view[:n])
            self.pos += n
        return n

    def pread(self, offset: int, view: memoryview) -> None:
        n = len(view)
        if n > CACHE_BYTES // 4:  # big: straight into the caller's buffer
            self.obj.read_into(offset, [view])
            return
        first, last = offset // BLOCK, (offset + n - 1) // BLOCK
        have: dict[int, bytes] = {}
        with _LOCK:
            for k in range(first, last + 1):
                block = _BLOCKS.get((*self._key, k))
                if block is not None:
                    _BLOCKS.move_to_end((*self._key, k))
                    have[k] = block
        missing = [k for k in range(first, last + 1) if k not in have]
        while missing:  # runs of consecutive missing blocks, one request each
            run = 1
            while run < len(missing) and missing[run] == missing[0] + run:
                run += 1
            lo = missing[0] * BLOCK
            buf = np.empty(min(self.size, (missing[0] + run) * BLOCK) - lo, np.uint8)
            self.obj.read_into(lo, [buf])
            for i in range(run):
                have[missing[i]] = block = buf[i * BLOCK:(i + 1) * BLOCK].tobytes()
                _keep((*self._key, missing[i]), block)
            missing = missing[run:]
        at = 0
        for k in range(first, last + 1):
            block = have[k]
            lo = max(offset - k * BLOCK, 0)
            take = min(len(block) - lo, n - at)
            view[at:at + take] = block[lo:lo + take]
            at += take


def open_h5(url: str, obj: RemoteObject | None = None) -> h5py.File:
    """The store at ``url`` opened by h5py over a :class:`RangeFile` (the object opened if not
    given; a version this process saw a moment ago is taken again: :func:`.objects.recent`).
    A sharded store's index is opened as the one-file store it stands for (:mod:`.shards`)."""
    f = open_one(url, obj or open_object(url, reuse=True))
    if "shards" in f.attrs:
        from streamnn.data.remote.shards import open_sharded
        return open_sharded(f, url, open_one)
    return f


def open_one(url: str, obj: RemoteObject) -> h5py.File:
    """h5py's file over a :class:`RangeFile` of ``obj`` (whose URL is ``url``)."""
    source = RangeFile(obj)
    try:
        f = h5py.File(source, "r")
    except StreamnnError:
        raise
    except OSError as exc:
        raise StreamnnError(f"not an HDF5 file or unreadable ({exc.__class__.__name__})", url) from None
    f._streamnn_source = source  # keeps the file object (and its connections) alive with the file
    return f
