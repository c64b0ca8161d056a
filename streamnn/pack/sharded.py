"""Packing a sharded store (the layout: docs/format.md): ranks, each a share of the rows.

*Packing* (:func:`pack_sharded`). Rank 0 checks the output and scans the source; the plan
goes to the other ranks as JSON bytes (the communicator of :mod:`streamnn.dist`: buffer calls,
no pickle, each with its deadline). Every rank builds the same row order from the seed,
decodes its share (:func:`streamnn.dist.part` of each split) into a temporary shard, and then
the ranks exchange rows and skipped files (JSON bytes) and the statistics' integer sums. Rank
0 applies the skip checks to the whole; only if they pass is every shard renamed into place,
and after that (a barrier) rank 0 writes the index, atomically. With ``--shards N`` (no MPI)
one process plays every rank in turn, with one decoding pool.

*Failures.* A rank that fails (or is killed) leaves no index. A rank whose decoding fails
(too many skipped files in its share, a dead worker, a read error) removes its temporary
shard and reports the error at the exchange; rank 0 then tells every rank, each removes its
own, and the error is reported once (:class:`~streamnn.dist.AgreedError`). Any other failure
of a rank aborts the job (``MPI_Abort``, :func:`streamnn.cli.common.user_errors`) after that
rank has cleaned up, as when a rank is killed; a rank that hangs makes the others abort after
``$STREAMNN_MPI_TIMEOUT`` seconds (:mod:`streamnn.dist`), which must therefore exceed how long
one rank may wait for another (rank 0's scan, the spread of the ranks' decoding times). Their
temporary shards are removed by the next run writing the same OUT (as stale temporary files:
unmodified since before that run started and not locked by HDF5).

*The shard folder* ``OUT.h5.shards`` belongs to the one index (:mod:`streamnn.pack.shardfolder`):
before decoding (and again before the shards are renamed into place), a file under the name
of a shard to write that is not provably this store's shard is refused, ``--force`` included;
after the index is written, the replaced index's shards that it no longer uses are removed;
nothing else in the folder is touched. ``--shards`` is at most the number of files to pack.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from streamnn.dist import AgreedError, Comm, agree, agreed, part
from streamnn.errors import StreamnnError
from streamnn.pack.job import PackJob, PackResult, RunningMoments, prepare_pack
from streamnn.pack.output import writing
from streamnn.pack.pool import default_workers
from streamnn.pack.scan import SourcePlan
from streamnn.data.format import part_name, shard_folder, shard_record
from streamnn.pack.shardfolder import ShardFolder
from streamnn.data.writer import StoreWriter
from streamnn.paths import path_text


def shard_items(job: PackJob, rank: int, size: int) -> list[tuple[str, str, int]]:
    """Rank ``rank``'s share of every split of ``job``'s row order (:func:`streamnn.dist.part` of each)."""
    items, start = [], 0
    for split in sorted(job.plan.files):
        n = len(job.plan.files[split])
        mine = part(n, rank, size)
        items += job.items[start + mine.start:start + mine.stop]
        start += n
    return items


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


def write_index(out: Path, size: int, *, store_kwargs: dict[str, Any], options: dict[str, Any],
                splits: Sequence[str], stats: tuple[np.ndarray, np.ndarray] | None,
                skipped: Sequence[tuple[str, str]]) -> str:
    """Write the index ``out`` over the committed shards ``OUT.h5.shards/part-<r>-of-<size>.h5``
    (``store_kwargs`` and ``options`` as for :class:`~streamnn.data.writer.StoreWriter`).
    Returns the fingerprint."""
    folder = shard_folder(out)
    names = [part_name(r, size) for r in range(size)]
    records, rows = [], []
    for name in names:
        records.append(shard_record(folder / name, f"{folder.name}/{name}"))
        with h5py.File(folder / name, "r") as f:
            rows.append({split: int(f[split]["y"].shape[0]) for split in splits})
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(StoreWriter(out, **store_kwargs, options=options))
        for split in sorted(splits):
            writer.add_virtual_split(split, [(rec["file"], n[split]) for rec, n in zip(records, rows)])
        if stats is not None:
            writer.set_stats(*stats)
        writer.set_skipped(sorted(skipped))
        writer.set_attribute("shards", json.dumps(records))
        fingerprint = writer.commit()
    return fingerprint


def _write_index(job: PackJob, size: int, moments: RunningMoments, skipped: list[tuple[str, str]]) -> str:
    return write_index(job.out, size, store_kwargs=job.store_kwargs, options=job.options, splits=list(job.plan.files),
                       stats=(moments.mean, moments.std) if moments.n else None, skipped=skipped)


def _result(job: PackJob, size: int, skipped: list[tuple[str, str]], fingerprint: str) -> PackResult:
    folder = shard_folder(job.out)
    total = job.out.stat().st_size + sum((folder / part_name(r, size)).stat().st_size for r in range(size))
    return job.result(sorted(skipped), fingerprint, total)


def check_shard_count(job: PackJob, size: int, what: str) -> None:
    """Refuse more shards than files to pack (``what`` names the option), and more than this
    process can hold open (one process writes every shard at once, two descriptors each)."""
    if size > max(1, len(job.items)):
        raise StreamnnError(f"{what} {size} is more than the {len(job.items)} image files to pack "
                            f"(at most one shard per file)", path_text(job.src))


def _check_open_files(size: int) -> None:
    """One process writing ``size`` shards at once needs two descriptors per shard."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return
    if soft != resource.RLIM_INFINITY and 2 * size + 64 > soft:
        raise StreamnnError(f"--shards {size} needs about {2 * size + 64} open files, more than this process "
                            f"may open (ulimit -n {soft}); use fewer shards, or mpiexec (one shard per rank)")


def pack_sharded(src: str | os.PathLike, out: str | os.PathLike, *, shards: int | None = None,
                 comm: Comm | None = None, progress: Callable[[int, int], None] | None = None,
                 **kwargs: Any) -> PackResult:
    """Pack ``src`` into the sharded store ``out`` (index) + ``OUT.h5.shards/`` (its whole name + ``.shards``).

    With a communicator ``comm`` of K > 1 ranks (:func:`streamnn.dist.world`), every rank must
    call this (same arguments) and rank r writes shard r of K; otherwise this process writes
    ``shards`` shards. ``kwargs`` are :func:`~streamnn.pack.job.prepare_pack`'s. Returns the
    result on every rank.
    """
    if comm is not None and comm.size > 1:
        if shards is not None and shards != comm.size:
            raise AgreedError(f"--shards {shards} under MPI: each of the {comm.size} ranks writes "
                              f"one shard (leave --shards out, or run mpiexec -n {shards})")
        return _pack_ranks(src, out, comm, progress, kwargs)
    size = 1 if shards is None else int(shards)
    if size < 1:
        raise StreamnnError(f"shards must be at least 1, not {size}")
    wall0 = time.time()
    job = prepare_pack(src, out, **kwargs)
    check_shard_count(job, size, "--shards")
    _check_open_files(size)
    names = [part_name(rank, size) for rank in range(size)]
    shards = ShardFolder(job.out, job.src)
    job.stale += shards.prepare(names, wall0)
    skipped, moments = list(job.plan.skipped), RunningMoments(job.n_features)
    with writing(shards.folder), contextlib.ExitStack() as stack:
        shares = [shard_items(job, rank, size) for rank in range(size)]
        decoder, writers = job.start(stack, [(shards.folder / name, items, shards.options(rank, size))
                                             for rank, (name, items) in enumerate(zip(names, shares))])
        rows = sum(job.decode_into(writer, items, decoder, moments, skipped, progress)
                   for writer, items in zip(writers, shares))
        job.check_usable(rows, skipped)
        decoder.close()
        shards.claim(names)  # nothing of someone else's appeared there meanwhile
        for writer in writers:  # every shard written out before any is renamed into place
            writer.flush()
        for writer in writers:
            writer.commit()
    fingerprint = _write_index(job, size, moments, skipped)
    shards.tidy(names)
    return _result(job, size, skipped, fingerprint)


def _prepare_ranks(src: str | os.PathLike, out: str | os.PathLike, comm: Comm, kwargs: dict[str, Any]) -> PackJob:
    """Rank 0 checks the output and scans; the other ranks take its plan. A failure on any rank
    is an :class:`~streamnn.dist.AgreedError` on every rank."""
    if comm.rank == 0:
        wall0 = time.time()

        def scan() -> PackJob:
            job = prepare_pack(src, out, **kwargs)
            check_shard_count(job, comm.size, "mpiexec -n")
            job.stale += ShardFolder(job.out, job.src).prepare([part_name(r, comm.size) for r in range(comm.size)],
                                                              wall0)
            return job

        job = agreed(comm, scan)
        comm.broadcast_bytes(plan_bytes(job.plan))
        return agreed(comm, lambda: job)
    agreed(comm, lambda: None)
    plan = plan_from_bytes(comm.broadcast_bytes(b""))
    return agreed(comm, lambda: prepare_pack(src, out, plan=plan, **kwargs))


def _pack_ranks(src: str | os.PathLike, out: str | os.PathLike, comm: Comm,
                progress: Callable[[int, int], None] | None, kwargs: dict[str, Any]) -> PackResult:
    rank, size = comm.rank, comm.size
    # every rank decodes with its own options: they must be rank 0's (not its decoding processes, nor
    # the command line rank 0 records)
    agreed(comm, lambda: agree(comm, "packing", {k: v for k, v in kwargs.items() if k not in ("workers", "command")}))
    job = _prepare_ranks(src, out, comm, kwargs)
    shards = ShardFolder(job.out, job.src)
    skipped = list(job.plan.skipped) if rank == 0 else []
    moments = RunningMoments(job.n_features)
    if progress is not None:  # rank 0's share, scaled to the whole
        report, progress = progress, lambda done, total: report(min(total, done * size), total)
    items, error = shard_items(job, rank, size), None
    stack = contextlib.ExitStack()
    try:
        with writing(shards.folder):
            decoder, (writer,) = job.start(stack, [(shards.folder / part_name(rank, size), items,
                                                    shards.options(rank, size))])
            rows = job.decode_into(writer, items, decoder, moments, skipped, progress)
            decoder.close()
            shards.claim([part_name(rank, size)])  # nothing of someone else's appeared there meanwhile
            writer.flush()
    except (StreamnnError, OSError) as exc:  # told to rank 0 below, which ends every rank cleanly
        stack.__exit__(type(exc), exc, exc.__traceback__)  # the temporary shard is removed
        error, rows = (str(exc) if isinstance(exc, StreamnnError) else
                       f"{exc.filename or ''}: {exc.strerror or exc}"), 0
    except BaseException as exc:
        stack.__exit__(type(exc), exc, exc.__traceback__)
        raise
    with stack:
        reports = comm.gather_bytes(json.dumps({"rows": rows, "skipped": skipped, "error": error}).encode("ascii"))
        sums = np.concatenate([[moments.n], moments.s1, moments.s2]).astype(np.int64)
        comm.allreduce(sums)  # exact: integer sums
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
        verdict = comm.broadcast_bytes(verdict)
        if verdict:
            raise AgreedError(verdict.decode("utf-8", "surrogateescape"))
        writer.commit()
    comm.barrier()  # every shard is in place

    def index() -> str:
        fingerprint = _write_index(job, size, moments, skipped)
        shards.tidy([part_name(r, size) for r in range(size)])
        return fingerprint

    fingerprint = agreed(comm, lambda: index() if rank == 0 else "")
    return _result(job, size, skipped, comm.broadcast_bytes(fingerprint.encode()).decode())


def rank_workers(comm: Comm) -> int:
    """Default decoding processes per rank: this machine's cores shared by its ranks."""
    return max(1, default_workers() // comm.local_size())
