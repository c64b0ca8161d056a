"""Rows of a remote store read by byte range: the ``pread`` reader's design over the network.

:class:`RemoteReader` is :class:`~streamnn.data.readers.pread.PreadReader` with its I/O swapped:
the batch's rows are sorted, each run of adjacent stored rows is one byte range (split at 1 MiB)
written straight into the rows' buffers, up to ``MAX_RANGES`` ranges in one GET where the server
answers several at once (``multipart/byteranges``: nginx, Apache; not S3), else one GET each;
``policy.threads`` requests are in flight, and the
coming batches (announced along the epoch order) are read ahead into staging buffers up to the
same byte bound as ``pread`` (so memory does not grow with the store). Every response is checked
against the object's version, so a batch never mixes two versions of the store.
"""
from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from streamnn.data.format import STORE_DTYPES, as_text, checked_split
from streamnn.data.readers.pread import PreadReader
from streamnn.data.remote.objects import RemoteObject
from streamnn.data.remote.rangefile import open_h5
from streamnn.errors import StreamnnError

#: Byte ranges (runs of rows) asked for in one request, where the server answers several at once.
MAX_RANGES = 16


class RemoteReader(PreadReader):
    """Contiguous X of one remote object, read by ranged GETs from a pool of threads."""

    mode = "remote"

    def __init__(self, obj: RemoteObject, offset: int, n_rows: int, n_features: int, dtype: np.dtype,
                 scale: float) -> None:
        # The pread machinery (batching, read-ahead, lending) over no local file: the I/O is ours.
        super().__init__(obj.url, offset, 0, n_features, dtype, scale, obj.policy.threads, segments=[])
        self.obj = obj
        self.n_rows = int(n_rows)
        self.offsets = [int(offset)]
        self._starts = [0, self.n_rows]
        self._task_rows = 1  # one request per pool task: every thread has its own request in flight
        need = offset + n_rows * self.row_bytes
        if need > obj.version.size:
            raise StreamnnError(f"the object ends at byte {obj.version.size}, before the end of its rows "
                                f"({need}: truncated?)", obj.url)

    def _submit(self, rows: np.ndarray, dest: list[np.ndarray] | np.ndarray) -> object:
        # A pool task is one request: one run each, or where the server answers several byte
        # ranges at once, the runs of up to MAX_RANGES rows, as many as keep every thread busy.
        many = self.obj.multi is not False
        self._task_rows = min(MAX_RANGES, max(1, -(-len(rows) // self.threads))) if many else 1
        return super()._submit(rows, dest)

    def _read_runs(self, first: list[int], count: list[int], where: list[int], dest: list[np.ndarray] | np.ndarray) -> int:
        """In a pool thread: the runs in one request (or one each), straight into the rows of ``dest``."""
        i, base, size = 0, self.offsets[0], self.row_bytes
        ranges = []
        for r, c in zip(first, count):
            ranges.append((base + r * size, [memoryview(dest[w]).cast("B") for w in where[i:i + c]]))
            i += c
        self.obj.read_many(ranges)
        return len(first)

    # -- the first batch: not behind the reads ahead ----------------------------------------------
    # The loader announces batches k+1.. before it reads batch k (unannounced). On a fresh stream
    # (opened, or after a jump) the announced batches are held until batch k's requests are
    # queued, so that the first batch waits for its own rows, not for the pool's whole queue.
    _fresh = True

    def expect(self, key: Hashable, rows: np.ndarray) -> None:
        group = self.group_rows
        if self._fresh:
            self.group_rows = 1 << 62  # hold: nothing is sent before the first read
        try:
            super().expect(key, rows)
        finally:
            self.group_rows = group

    def _read(self, rows: np.ndarray, out: np.ndarray, key: Hashable) -> np.ndarray:
        if not self._fresh or (key is not None and key in self._ahead_keys):
            self._fresh = False
            return super()._read(rows, out, key)
        self._fresh = False
        dest = out if self._direct else self._staging(len(rows))
        reads = self._submit(rows, dest)  # first in the pool's queue
        held, self._unsent = self._unsent, []
        for batch in held:  # then the announced batches, in the usual groups
            self._unsent.append(batch)
            if sum(len(b.rows) for b in self._unsent) >= self.group_rows:
                self._send()
        self._wait(reads)
        if not self._direct:
            self._convert(dest, out)
        return out

    def forget(self) -> None:
        super().forget()
        self._fresh = True

    def check(self, path: bool = True) -> None:
        """Nothing to do between batches: every response was checked against the version."""

    def close(self) -> None:
        super().close()
        self.obj.close()


def open_remote_rows(url: str, split: str, *, fingerprint: str | None = None, **_: object) -> RemoteReader:
    """The row reader of ``split`` of the store at ``url``: :class:`RemoteReader` for the default
    layout (uncompressed, contiguous X; a sharded store's rows through its view, :mod:`.shards`);
    other layouts are a one-line error."""
    f = open_h5(url)
    source = f._streamnn_source
    try:
        attrs = f.attrs
        dset = checked_split(f, split, fingerprint, url)
        dtype = np.dtype(STORE_DTYPES[str(as_text(attrs["dtype"]))])
        scale = float(attrs["scale"])
        n, d = (int(s) for s in dset.shape)
        if dset.chunks is not None:
            raise StreamnnError(f"split {split!r} is chunked or compressed: only the default layout "
                                f"(uncompressed, contiguous) is streamed from a URL; repack without --compression", url)
        offset = dset.id.get_offset()
        if n > 0 and offset is not None and dset.dtype == dtype and dset.dtype.isnative and f.userblock_size == 0:
            raw = np.empty((1, d), dtype)
            source.pread(int(offset), memoryview(raw).cast("B"))  # through the metadata's blocks
            if np.array_equal(raw[0], dset[0], equal_nan=dtype.kind == "f"):  # the offset is right
                reader = RemoteReader(source.obj, int(offset), n, d, dtype, scale)
                f.close()
                return reader
        raise StreamnnError(f"split {split!r}: X cannot be read by byte range (not native, contiguous rows)", url)
    except BaseException:
        if f.id.valid:
            f.close()
        source.obj.close()
        raise
