"""A local disk cache of remote objects' blocks: a byte limit, crash-safe, shared by processes.

Set by ``STREAMNN_REMOTE_CACHE=FOLDER`` and ``STREAMNN_REMOTE_CACHE_LIMIT=SIZE`` (the commands'
``--cache`` / ``--cache-limit``, :func:`streamnn.data.remote.set_cache`). An object is cached in
aligned ``BLOCK`` blocks, each an *entry* file ``snc1-<key>-<block>.blk`` keyed by the object's
identity (sha256 of its URL, size, ETag and Last-Modified: a changed object has other entries,
and its old ones are never read again). A read takes the blocks the folder holds from there;
the rest is read from the server as without a cache (the first batch does not wait for whole
blocks), and the blocks it touched are queued for *filling*: a few threads read each whole
block once and write it as an entry, so a later epoch reads local disk only.

- **Crash-safe.** An entry is written to a temporary file (``.snc1-...tmp``), fsynced and then
  linked to its name, never overwriting a file: a killed writer leaves only a temporary, never a
  partial entry. An entry's header holds a magic, the object's identity, the block number, the
  length and a CRC-32 of the bytes; an entry is used only if all match (the CRC is checked once
  per file and process). Temporaries older than ``STALE_SECONDS`` are removed.
- **Ours only.** Files are ours when their name has our pattern *and* they begin with our magic:
  nothing else in the folder is read, counted, evicted or overwritten.
- **Byte limit.** Entries are evicted least recently used first (their modification time, set
  again when a process first reads them) whenever a scan finds them over the limit; scans follow
  the writes. An object larger than the limit has only its first blocks cached (a fixed part
  gives a shuffled epoch the same hits as LRU would, without evicting itself over and over).
- **Shared.** Processes of one machine (the ranks of a job, a DataLoader's workers) can share
  the folder: entries appear atomically, and a block is filled by one process at a time (a
  ``fcntl`` lock on its byte of ``snc1-<key>.lock``; correctness never depends on it, only the
  bytes downloaded do).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamnn.errors import StreamnnError
from streamnn.paths import path_text

#: Bytes of an object per entry (the last block of an object may be shorter).
BLOCK = 4 << 20
MAGIC = b"streamnn-cache1\n"
_HEAD = struct.Struct("<16s32sQQI")
HEADER = 128
#: Threads of a process filling blocks.
FILL_THREADS = 4
#: A temporary unmodified for this long belongs to a writer that died.
STALE_SECONDS = 600.0
#: A process sets an entry's modification time (its LRU age) at most this often.
TOUCH_SECONDS = 60.0
#: A scan (and eviction) after this many entries written, or after each one once the limit is near.
SCAN_EVERY = 16
DEFAULT_LIMIT = "10G"
ENTRY = re.compile(r"snc1-([0-9a-f]{32})-(\d{1,12})\.blk")
TEMP = re.compile(r"\.snc1-[0-9a-f]{32}-\d{1,12}\.\d+\.[0-9a-f]{8}\.tmp")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str) -> int:
    """``2G``, ``500M``, ``1.5T``, ``4096`` (K, M, G, T: powers of 1024; a trailing B or iB allowed)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if m is None:
        raise StreamnnError(f"{what} {text!r} is not a size (e.g. 2G, 500M or 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def cache_from_env() -> tuple[str, int]:
    """The cache folder ("" for none) and its byte limit, from the environment."""
    folder = os.environ.get("STREAMNN_REMOTE_CACHE", "").strip()
    limit = os.environ.get("STREAMNN_REMOTE_CACHE_LIMIT", "").strip() or DEFAULT_LIMIT
    return folder, parse_size(limit, "STREAMNN_REMOTE_CACHE_LIMIT")


def identity(url: str, version: Any) -> bytes:
    """The sha256 naming an object version's entries."""
    return hashlib.sha256("\0".join([url, str(version.size), str(version.etag), str(version.modified)]).encode()).digest()


def _ours(path: str) -> bool:
    """Whether the file at ``path`` begins with our magic (our name pattern is checked before)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class BlockCache:
    """The cached blocks of one object version (``obj``: a :class:`~.objects.RemoteObject`)."""

    def __init__(self, folder: str, limit: int, obj: Any) -> None:
        self.folder, self.limit, self.obj = Path(folder), int(limit), obj
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            writable = os.access(self.folder, os.W_OK | os.X_OK)
        except OSError as exc:
            raise StreamnnError(f"cannot use the cache folder ({exc.strerror or exc})", path_text(self.folder)) from None
        if not writable:
            raise StreamnnError("cannot use the cache folder (not writable)", path_text(self.folder))
        self.ident = identity(obj.url, obj.version)
        self.key = self.ident.hex()[:32]
        self.size = obj.version.size
        #: Blocks that may be cached: all, or the first ones that fit in the limit.
        self.eligible = min(-(-self.size // BLOCK), self.limit // (BLOCK + HEADER))
        self.hits = 0  # bytes read from entries (by this process)
        self.filled = 0  # entries written by this process
        self._lock = threading.Condition()
        self._queue: deque[int] = deque()
        self._queued: set[int] = set()
        self._fillers = 0
        self._stop = False
        self._verified: set[tuple[int, int]] = set()  # (dev, inode) of entries whose CRC matched
        self._touched: dict[int, float] = {}
        self._lockfd: int | None = None
        self._pid = os.getpid()
        self._scanned = self.limit  # bytes of our entries at the last scan (none yet: the first write scans)
        self._since_scan = 0  # entries written since

    def _path(self, k: int) -> str:
        return os.path.join(self.folder, f"snc1-{self.key}-{k}.blk")

    def _length(self, k: int) -> int:
        return min(BLOCK, self.size - k * BLOCK)

    # -- reading ----------------------------------------------------------------------------------
    def read_many(self, ranges: Sequence[tuple[int, Sequence[memoryview]]]) -> None:
        """Each range's sinks from its offset: entries where they exist, the server for the rest
        (the missing pieces of all the ranges in one :meth:`~.objects.RemoteObject.fetch_many`)."""
        pending: list[tuple[int, list[memoryview]]] = []
        missing: set[int] = set()
        for offset, sinks in ranges:
            ends, total = [], 0
            for s in sinks:
                total += len(s)
                ends.append(total)
            run: tuple[int, int] | None = None  # a run of this range's bytes to read from the server
            pos, end = offset, offset + total
            while pos <= end:
                k = pos // BLOCK
                hi = min(end, (k + 1) * BLOCK)
                if pos < end and not self._read_entry(k, pos - k * BLOCK, _cut(sinks, ends, pos - offset, hi - offset)):
                    missing.add(k)
                    run = (run[0] if run else pos, hi)
                elif run:
                    pending.append((run[0], _cut(sinks, ends, run[0] - offset, run[1] - offset)))
                    run = None
                if pos == end:
                    break
                pos = hi
        if pending:
            self.obj.fetch_many(pending)
        for k in sorted(missing):
            self._want(k)

    def _read_entry(self, k: int, at: int, views: list[memoryview]) -> bool:
        """Read ``views`` from block ``k``'s entry at ``at``; False if there is no valid entry."""
        path = self._path(k)
        fd = self._open_valid(k, path)
        if fd is None:
            return False
        try:
            want = sum(len(v) for v in views)
            if os.preadv(fd, views, HEADER + at) != want:
                return False  # cannot happen to a valid entry (its size was checked): read it again
        finally:
            os.close(fd)
        self.hits += want
        now = time.monotonic()
        if now - self._touched.get(k, -TOUCH_SECONDS) >= TOUCH_SECONDS:
            self._touched[k] = now
            with contextlib.suppress(OSError):
                os.utime(path)
        return True

    def _valid(self, fd: int, k: int, path: str) -> bool:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in self._verified:
            return True
        length = self._length(k)
        if st.st_size != HEADER + length:
            return False
        head = os.pread(fd, _HEAD.size, 0)
        magic, ident, block, size, crc = _HEAD.unpack(head)
        if magic != MAGIC or ident != self.ident or block != k or size != length:
            return False
        data = os.pread(fd, length, HEADER)
        if len(data) != length or zlib.crc32(data) != crc:
            with contextlib.suppress(OSError):  # ours (name and magic), damaged: replace it
                if os.stat(path).st_ino == st.st_ino:
                    os.unlink(path)
            return False
        self._verified.add((st.st_dev, st.st_ino))
        return True

    # -- filling ----------------------------------------------------------------------------------
    def _want(self, k: int) -> None:
        if k >= self.eligible:
            return
        with self._lock:
            if self._stop or k in self._queued:
                return
            if self._pid != os.getpid():  # a forked child: the parent's threads are not here
                self._pid, self._fillers, self._lockfd = os.getpid(), 0, None
                self._queue.clear()
                self._queued.clear()
            self._queued.add(k)
            self._queue.append(k)
            if self._fillers < FILL_THREADS:
                self._fillers += 1
                threading.Thread(target=self._filler, name="streamnn-cache-fill", daemon=True).start()

    def _filler(self) -> None:
        while True:
            with self._lock:
                if self._stop or not self._queue:
                    self._fillers -= 1
                    self._lock.notify_all()
                    return
                k = self._queue.popleft()
            try:
                self._fill(k)
            except StreamnnError:  # the server or the object failed: the readers will say so
                self.close(wait=False)
            except OSError:  # the folder is full or unwritable: read from the server from now on
                self.close(wait=False)

    def _fill(self, k: int) -> None:
        if self._exists(k):
            return
        lockfd = self._lockfile()
        try:
            fcntl.lockf(lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, k)
        except OSError:  # another process is filling it
            with self._lock:
                self._queued.discard(k)  # wanted again if still missing later
            return
        tmp = None
        try:
            if self._exists(k):
                return
            data = bytearray(self._length(k))
            self.obj.fetch_many([(k * BLOCK, [memoryview(data)])])
            tmp = os.path.join(self.folder, f".snc1-{self.key}-{k}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                head = _HEAD.pack(MAGIC, self.ident, k, len(data), zlib.crc32(data)).ljust(HEADER, b"\0")
                view = memoryview(head + data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):  # never over a file: another writer won
                os.link(tmp, self._path(k))
                self._verified.add((st.st_dev, st.st_ino))
                self.filled += 1
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            fcntl.lockf(lockfd, fcntl.LOCK_UN, 1, k)
        self._since_scan += 1
        near = self._scanned + (self._since_scan + SCAN_EVERY) * (BLOCK + HEADER) > self.limit
        if near or self._since_scan >= SCAN_EVERY:
            self.evict()

    def _exists(self, k: int) -> bool:
        fd = self._open_valid(k, self._path(k))
        if fd is not None:
            os.close(fd)
        return fd is not None

    def _open_valid(self, k: int, path: str) -> int | None:
        """A descriptor of block ``k``'s entry at ``path`` if it is a valid one, else None."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        try:
            if self._valid(fd, k, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def _lockfile(self) -> int:
        with self._lock:
            if self._lockfd is None:
                self._lockfd = os.open(os.path.join(self.folder, f"snc1-{self.key}.lock"),
                                       os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            return self._lockfd

    def evict(self) -> int:
        """Remove our least recently used entries until they fit in the limit, and our stale
        temporaries; returns the bytes our entries hold after it."""
        entries, now = [], time.time()
        for item in os.scandir(self.folder):
            with contextlib.suppress(OSError):
                if ENTRY.fullmatch(item.name):
                    st = item.stat(follow_symlinks=False)
                    entries.append((st.st_mtime, st.st_size, item.path))
                elif TEMP.fullmatch(item.name) and now - item.stat(follow_symlinks=False).st_mtime > STALE_SECONDS:
                    if _ours(item.path):
                        os.unlink(item.path)
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit:
                break
            if _ours(path):  # a file named like ours but not ours is never removed
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            total -= size
        self._scanned, self._since_scan = total, 0
        return total

    def settle(self, timeout: float = 60.0) -> bool:
        """Wait until the blocks queued are filled (True) or ``timeout`` seconds have passed."""
        end = time.monotonic() + timeout
        with self._lock:
            while self._fillers and not self._stop:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, wait: bool = True) -> None:
        """Stop filling (the block being written is finished first when ``wait``)."""
        with self._lock:
            self._stop = True
            self._queue.clear()
            if wait:
                end = time.monotonic() + 5.0
                while self._fillers and time.monotonic() < end:
                    self._lock.wait(0.1)
            if self._lockfd is not None and not self._fillers and self._pid == os.getpid():
                os.close(self._lockfd)
                self._lockfd = None


def _cut(sinks: Sequence[memoryview], ends: list[int], lo: int, hi: int) -> list[memoryview]:
    """Views of bytes ``lo:hi`` of the concatenation of ``sinks`` (``ends``: their running ends)."""
    out, start = [], 0
    for s, e in zip(sinks, ends):
        if e > lo and start < hi:
            out.append(s[max(lo - start, 0):min(hi, e) - start])
        start = e
        if start >= hi:
            break
    return out
