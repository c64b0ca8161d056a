"""Sharded stores: packed by several processes (MPI ranks, or ``--shards N`` in one), read as one.

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
(:class:`~streamnn.pack.RunningMoments`, summed across ranks by an integer reduction), and
the fingerprint is computed over the labels and paths read through the virtual datasets.

*Integrity.* HDF5 reads the fill value (zeros) where a virtual dataset's source file is
missing, silently. So the index records, in its root attribute ``shards`` (JSON), each
shard's file name, size, own fingerprint and a digest of its metadata (root attributes and
dataset shapes, :func:`metadata_digest`); :func:`check_index` (run by every
:class:`~streamnn.store.Store` open and by every row reader open) stops with a one-line
error naming the shard that is missing, altered or not recorded. ``Store.verify`` also
verifies every shard's own fingerprint.

*Reading.* A virtual dataset has no file offset (it cannot be memory-mapped) and h5py reads
through it slowly, so :class:`SegmentReader` sees a split as a list of segments (shard
file, rows): each shard's X is opened with the best one-file strategy
(:func:`~streamnn.rowreader.open_rows`: a memory map for contiguous X) and a batch is
gathered segment by segment into a staging buffer, then put in batch order.

*Packing* (:func:`pack_sharded`). Rank 0 checks the output and scans the source; the plan
goes to the other ranks as JSON bytes (no pickle: only mpi4py's buffer calls are used,
non-blocking and polled, so signals are acted on while a rank waits). Every rank builds
the same row order from the seed, decodes its share into a temporary shard, and then the
ranks exchange rows and skipped files (JSON bytes) and the statistics' integer sums
(``Ireduce``). Rank 0 applies the skip checks to the whole; only if they pass is every
shard renamed into place, and after that (a barrier) rank 0 writes the index, atomically.
With ``--shards N`` (no MPI) one process plays every rank in turn, with one decoding pool.

*Failures.* A rank that fails (or is killed) leaves no index. A rank whose decoding fails
(too many skipped files in its share, a dead worker, a read error) removes its temporary
shard and reports the error at the exchange; rank 0 then tells every rank, each removes its
own, and the error is reported once. Any other failure of a rank makes the command abort the
job (``MPI_Abort``) after that rank has cleaned up, and ``mpiexec`` ends the others, as it
does when a rank is killed; their temporary shards are removed by the next run writing the
same OUT (as stale temporary files: unmodified since before that run started and not locked
by HDF5). After
an index is written, shard files of the folder's ``part-<r>-of-<K>.h5`` form that it does
not reference (an earlier run with another K) are removed; nothing else in the folder is
touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .atomic import TMP_PREFIX
from .dist import INSTALL_HINT, launcher_world
from .errors import StreamnnError
from .pack import (PackJob, PackResult, RunningMoments, SourcePlan, _within, _writing, default_workers,
                   prepare_pack, remove_stale_temps)
from .paths import path_text
from .rowreader import MemmapReader, PreadReader, RowReader, fits_in_memory, open_rows
from .store import StoreWriter

FOLDER_SUFFIX = ".shards"
_PART = re.compile(r"part-(\d+)-of-(\d+)\.h5")
_POLL_S = 0.005


def shard_folder(index: str | os.PathLike) -> Path:
    """``OUT.shards`` beside the index ``OUT.h5``."""
    index = Path(index)
    return index.with_name(index.stem + FOLDER_SUFFIX)


def part_name(rank: int, size: int) -> str:
    return f"part-{rank}-of-{size}.h5"


def share(n: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s rows of ``n``: a contiguous, balanced block."""
    return slice(n * rank // size, n * (rank + 1) // size)


def shard_items(job: PackJob, rank: int, size: int) -> list[tuple[str, str, int]]:
    """Rank ``rank``'s share of every split of ``job``'s row order."""
    items, start = [], 0
    for split in sorted(job.plan.files):
        n = len(job.plan.files[split])
        part = share(n, rank, size)
        items += job.items[start + part.start:start + part.stop]
        start += n
    return items


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
    (Shards read with ``pread`` are one :class:`~streamnn.rowreader.PreadReader` over all the
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
    :func:`~streamnn.rowreader.open_rows` (``kwargs``); ``reader="auto"`` chooses memory maps
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


# -- packing ---------------------------------------------------------------------------------------
class CollectiveError(StreamnnError):
    """An error every rank raises alike (rank 0 decided it and told the others): the command
    reports it once, from rank 0, and the ranks end normally."""


class _Ranks:
    """The few collective operations packing needs, over an mpi4py communicator: bytes and
    int64 arrays only (buffer calls, no pickle), non-blocking and polled, so that a rank
    waiting for the others still acts on SIGINT / SIGTERM (and does not spin a core)."""

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        self.comm, self._byte, self._sum = comm, MPI.BYTE, MPI.SUM
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    @staticmethod
    def _wait(request: Any) -> None:
        while not request.Test():
            time.sleep(_POLL_S)

    def bcast(self, data: bytes = b"") -> bytes:
        """Rank 0's ``data`` on every rank."""
        n = np.array([len(data)], np.int64)
        self._wait(self.comm.Ibcast(n, root=0))
        buf = np.frombuffer(data, np.uint8).copy() if self.rank == 0 else np.empty(int(n[0]), np.uint8)
        self._wait(self.comm.Ibcast(buf, root=0))
        return buf.tobytes()

    def gather(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on rank 0 (an empty list elsewhere)."""
        sizes = np.zeros(self.size, np.int64)
        self._wait(self.comm.Igather(np.array([len(data)], np.int64), sizes, root=0))
        send = np.frombuffer(data, np.uint8)
        if self.rank != 0:
            self._wait(self.comm.Igatherv(send, None, root=0))
            return []
        recv = np.empty(int(sizes.sum()), np.uint8)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._wait(self.comm.Igatherv(send, [recv, sizes.tolist(), offsets.tolist(), self._byte], root=0))
        return [recv[o:o + n].tobytes() for o, n in zip(offsets.tolist(), sizes.tolist())]

    def reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """The elementwise sum of every rank's int64 ``values`` (exact), on rank 0."""
        total = np.zeros_like(values)
        self._wait(self.comm.Ireduce(values, total, op=self._sum, root=0))
        return total

    def barrier(self) -> None:
        self._wait(self.comm.Ibarrier())


def plan_bytes(plan: SourcePlan) -> bytes:
    """A scan as JSON bytes (file names that are not UTF-8 survive as escaped surrogates)."""
    data = asdict(plan)
    data["root"] = os.fspath(plan.root)
    return json.dumps(data).encode("ascii")


def plan_from_bytes(data: bytes) -> SourcePlan:
    d = json.loads(data.decode("ascii"))
    return SourcePlan(root=Path(d["root"]), layout=d["layout"], class_names=d["class_names"],
                      files={s: [(p, int(y)) for p, y in v] for s, v in d["files"].items()},
                      split_folders=d["split_folders"], skipped=[(p, r) for p, r in d["skipped"]],
                      ignored_hidden=int(d["ignored_hidden"]), warnings=d["warnings"])


def _prepare_folder(out: Path, src: Path, older_than: float) -> list[Path]:
    """Create ``OUT.shards`` if needed (refusing a link, a non-folder, or one inside SRC or
    holding it); remove the temporary shards of killed runs in it."""
    folder = shard_folder(out)
    where = path_text(folder)
    if folder.is_symlink():
        raise StreamnnError("is a symbolic link; the shards go in a folder of that name beside OUT", where)
    if folder.exists() and not folder.is_dir():
        raise StreamnnError("exists and is not a folder; the shards of a sharded store go there", where)
    real, real_src = os.path.realpath(folder), os.path.realpath(src)
    if _within(real, real_src) or _within(real_src, real):
        raise StreamnnError(f"the shard folder and SRC {path_text(src)} overlap; write the store elsewhere", where)
    folder.mkdir(exist_ok=True)
    removed = []
    for tmp in folder.glob(TMP_PREFIX + "part-*-of-*.h5.*"):
        name = tmp.name[len(TMP_PREFIX):].rsplit(".", 1)[0]
        if _PART.fullmatch(name):
            removed += remove_stale_temps(folder / name, older_than)
    return removed


def write_index(out: Path, size: int, *, store_kwargs: dict[str, Any], options: dict[str, Any],
                splits: Sequence[str], stats: tuple[np.ndarray, np.ndarray] | None,
                skipped: Sequence[tuple[str, str]]) -> str:
    """Write the index ``out`` over the committed shards ``OUT.shards/part-<r>-of-<size>.h5``
    (``store_kwargs`` and ``options`` as for :class:`~streamnn.store.StoreWriter`); remove
    shard files of the folder it does not reference. Returns the fingerprint."""
    folder = shard_folder(out)
    names = [part_name(r, size) for r in range(size)]
    records, rows = [], []
    for name in names:
        records.append(shard_record(folder / name, f"{folder.name}/{name}"))
        with h5py.File(folder / name, "r") as f:
            rows.append({split: int(f[split]["y"].shape[0]) for split in splits})
    with StoreWriter(out, **store_kwargs, options=options) as writer:
        for split in sorted(splits):
            writer.add_virtual_split(split, [(rec["file"], n[split]) for rec, n in zip(records, rows)])
        if stats is not None:
            writer.set_stats(*stats)
        writer.set_skipped(sorted(skipped))
        writer.set_attribute("shards", json.dumps(records))
        fingerprint = writer.commit()
    for path in folder.iterdir():
        if _PART.fullmatch(path.name) and path.name not in names:
            with contextlib.suppress(OSError):
                path.unlink()
    return fingerprint


def _write_index(job: PackJob, size: int, moments: RunningMoments, skipped: list[tuple[str, str]]) -> str:
    return write_index(job.out, size, store_kwargs=job.store_kwargs, options=job.options, splits=list(job.plan.files),
                       stats=(moments.mean, moments.std) if moments.n else None, skipped=skipped)


def _result(job: PackJob, skipped: list[tuple[str, str]], fingerprint: str) -> PackResult:
    folder = shard_folder(job.out)
    size = job.out.stat().st_size + sum(p.stat().st_size for p in folder.iterdir() if _PART.fullmatch(p.name))
    return job.result(sorted(skipped), fingerprint, size)


def pack_sharded(src: str | os.PathLike, out: str | os.PathLike, *, shards: int | None = None, comm: Any = None,
                 progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> PackResult:
    """Pack ``src`` into the sharded store ``out`` (index) + ``OUT.shards/``.

    With an mpi4py communicator ``comm`` of K ranks, every rank must call this (same
    arguments) and rank r writes shard r of K; otherwise this process writes ``shards``
    shards. ``kwargs`` are :func:`~streamnn.pack.prepare_pack`'s. Returns the result on
    every rank.
    """
    if comm is not None and comm.Get_size() > 1:
        if shards is not None and shards != comm.Get_size():
            raise StreamnnError(f"--shards {shards} under MPI: each of the {comm.Get_size()} ranks writes "
                                f"one shard (leave --shards out, or run mpiexec -n {shards})")
        return _pack_ranks(src, out, _Ranks(comm), progress, kwargs)
    size = 1 if shards is None else int(shards)
    if size < 1:
        raise StreamnnError(f"shards must be at least 1, not {size}")
    wall0 = time.time()
    job = prepare_pack(src, out, **kwargs)
    job.stale += _prepare_folder(job.out, job.src, wall0)
    skipped, moments = list(job.plan.skipped), RunningMoments(job.n_features)
    folder = shard_folder(job.out)
    with _writing(folder), contextlib.ExitStack() as stack:
        shares = [shard_items(job, rank, size) for rank in range(size)]
        decoder, writers = job.start(stack, [(folder / part_name(rank, size), items, {"shard": [rank, size]})
                                             for rank, items in enumerate(shares)])
        rows = sum(job.decode_into(writer, items, decoder, moments, skipped, progress)
                   for writer, items in zip(writers, shares))
        job.check_usable(rows, skipped)
        decoder.close()
        for writer in writers:
            writer.commit()
    return _result(job, skipped, _write_index(job, size, moments, skipped))


def _pack_ranks(src: str | os.PathLike, out: str | os.PathLike, ranks: _Ranks,
                progress: Callable[[int, int], None] | None, kwargs: dict[str, Any]) -> PackResult:
    rank, size = ranks.rank, ranks.size
    if rank == 0:
        wall0 = time.time()
        try:
            job = prepare_pack(src, out, **kwargs)
            job.stale += _prepare_folder(job.out, job.src, wall0)
        except StreamnnError as exc:
            ranks.bcast(b"E" + str(exc).encode("utf-8", "surrogateescape"))
            raise CollectiveError(str(exc)) from None
        ranks.bcast(b"P" + plan_bytes(job.plan))
    else:
        data = ranks.bcast()
        if data[:1] == b"E":
            raise CollectiveError(data[1:].decode("utf-8", "surrogateescape"))
        job = prepare_pack(src, out, plan=plan_from_bytes(data[1:]), **kwargs)
    skipped = list(job.plan.skipped) if rank == 0 else []
    moments = RunningMoments(job.n_features)
    if progress is not None:  # rank 0's share, scaled to the whole
        report, progress = progress, lambda done, total: report(min(total, done * size), total)
    items, error = shard_items(job, rank, size), None
    stack = contextlib.ExitStack()
    try:
        with _writing(shard_folder(job.out)):
            decoder, (writer,) = job.start(stack, [(shard_folder(job.out) / part_name(rank, size), items,
                                                    {"shard": [rank, size]})])
            rows = job.decode_into(writer, items, decoder, moments, skipped, progress)
            decoder.close()
    except (StreamnnError, OSError) as exc:  # told to rank 0 below, which ends every rank cleanly
        stack.__exit__(type(exc), exc, exc.__traceback__)  # the temporary shard is removed
        error, rows = (str(exc) if isinstance(exc, StreamnnError) else
                       f"{exc.filename or ''}: {exc.strerror or exc}"), 0
    except BaseException as exc:
        stack.__exit__(type(exc), exc, exc.__traceback__)
        raise
    with stack:
        reports = ranks.gather(json.dumps({"rows": rows, "skipped": skipped, "error": error}).encode("ascii"))
        sums = ranks.reduce_sum(np.concatenate([[moments.n], moments.s1, moments.s2]).astype(np.int64))
        verdict = b""
        if rank == 0:
            parts = [json.loads(r) for r in reports]
            skipped = [(p, why) for part in parts for p, why in part["skipped"]]
            d = job.n_features
            moments.n, moments.s1, moments.s2 = int(sums[0]), sums[1:1 + d], sums[1 + d:]
            failed = [f"rank {r}: {part['error']}" for r, part in enumerate(parts) if part["error"]]
            try:
                if failed:
                    raise StreamnnError(failed[0])
                job.check_skips(skipped)
                job.check_usable(sum(part["rows"] for part in parts), skipped)
            except StreamnnError as exc:
                verdict = str(exc).encode("utf-8", "surrogateescape")
        verdict = ranks.bcast(verdict)
        if verdict:
            raise CollectiveError(verdict.decode("utf-8", "surrogateescape"))
        writer.commit()
    ranks.barrier()  # every shard is in place
    fingerprint = _write_index(job, size, moments, skipped).encode() if rank == 0 else b""
    fingerprint = ranks.bcast(fingerprint)
    return _result(job, skipped, fingerprint.decode())


# -- MPI ---------------------------------------------------------------------------------------------
def mpi_world() -> Any:
    """``MPI.COMM_WORLD`` when this process is one of several ranks started by ``mpiexec``
    (judged from the launcher's environment by :func:`streamnn.dist.launcher_world`, the one
    place that knows the launchers, so that mpi4py is imported only then), else None."""
    rank, size = launcher_world()
    if size <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise StreamnnError(f"started by mpiexec as rank {rank} of {size}, but mpi4py is not installed: "
                            f"{INSTALL_HINT}") from None
    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def rank_workers(comm: Any) -> int:
    """Default decoding processes per rank: this machine's cores shared by its ranks."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return max(1, default_workers() // local.Get_size())
    finally:
        local.Free()
