"""Pack an image folder tree into a streamnn store (see :mod:`streamnn.data.store` for the format).

Design: ``scan_source`` -> ``pack`` (plan, permute, decode in a pool, write in order).

*Layout* (:func:`scan_source`). SRC holds split folders or class folders:

- ``SRC/training_set/<class>/...`` and ``SRC/test_set/<class>/...`` (Kaggle): split folders;
  ``training_set`` becomes split ``train``, ``test_set`` becomes ``test``, any other split
  folder keeps its name. SRC is read as split folders when one of its folders is named
  ``training_set``, ``test_set``, ``train``, ``test``, ``val``, ``valid`` or ``validation``,
  or when none of its folders holds files directly.
- ``SRC/<class>/...``: one split, named ``train``.
- Download nesting is unwrapped: a SRC holding nothing but one folder of folders
  (``dataset/training_set/...``), and a split folder holding nothing but a folder of the same
  name (``training_set/training_set/cats``).

Files in a class folder (and its subfolders) are ordered by *natural* sort of their paths
(``cat.2`` before ``cat.10``); ``per_class=N`` keeps the first N files of each class in
each split (like the tutorial's ``data_num``; files that then fail to decode are skipped,
not replaced). Labels follow ``classes`` if given (folders of other classes are left out,
a listed class found in no split is an error), otherwise the sorted class folder names of
all splits. A class with no file in some split is a *warning*, not an error (small test
sets may lack one), reported before packing, in the summary and in ``options.warnings``.

Hidden files and folders (names starting with ``.``) and ``__MACOSX`` folders are
ignored silently: they are counted (``options.ignored_hidden`` and the summary) but are
not skipped files. Every other file is a candidate image, whatever its extension; the ones
that do not decode (see :mod:`streamnn.pack.decode`) are skipped and listed with their reason,
as are files lying in a split folder outside any class folder. If more than
``max_skip_fraction`` of the candidates are skipped, or none decodes, packing fails and
nothing is written.

*Order.* Each split's rows are a permutation of its files drawn from ``make_rng(seed)``
(splits in sorted name order), so classes are interleaved and contiguous reads are mixed;
``paths`` keeps each row's source. Decoding happens in ``workers`` decoders (this process and
``workers - 1`` worker processes; 1 means in-process), fed a bounded window of chunks and
read back in submission order, so the output does not depend on the number of workers and
memory does not grow with the dataset.

*Statistics.* Per-feature mean and (population, ddof=0) std of the normalized pixels
(uint8 / 255, whatever ``dtype`` stores) of split ``train``, or of the first split in
sorted order when there is no ``train`` (recorded as ``options.stats_split``). Workers
return exact integer pixel sums per chunk; this process adds them up exactly and rounds
once at the end (see :class:`RunningMoments`), so the results depend neither on ``workers``
nor on how the rows are cut into chunks or shards.

*Processes and failure.* Workers are ``subprocess`` children running
:func:`streamnn.pack.worker.worker_main` (no fork of this process, whose OpenCV threads would deadlock a forked child; no
multiprocessing fork server or resource tracker; no pickle: paths go as bytes, results as
JSON and raw arrays; no ``__main__`` guard needed in scripts). They start with SIGINT and
SIGTERM blocked, so only this process acts on them, and die with it (see :class:`_Decoder`);
a worker that dies makes packing fail with a message instead of hanging. Output goes through
:class:`~streamnn.data.store.StoreWriter`: on any error or Ctrl-C (the CLI maps SIGTERM to it) the
workers are killed and reaped and the temporary file removed, and a previous store stays as
it was. A SIGKILLed run cannot clean up its ``.streamnn-tmp-*`` file; the next run writing the
same output removes it. Disk full, read-only folders and I/O errors while writing become the
OSError ``OUT: <what the errno means>`` (:func:`streamnn.atomic.write_error`), one line at the CLI.

*What OUT may be* (:func:`_check_output`, before anything is written): not inside SRC (both
resolved), not a folder, symbolic link, device, FIFO or socket, and, if it exists, only with
``force`` and only if it is a streamnn store by content (:func:`is_store_file`).

*Links and names.* File links are read as files. A folder link is followed once, unless it
leads back into SRC, to a folder holding SRC (a loop), or into or above a folder already
reached through a link; those are skipped with that reason (:class:`_Lister`). Every path
stored or reported, and every class name, is in :func:`streamnn.paths.path_text` form
(lossless for names that are not UTF-8).
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import re
import select
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

import h5py

from streamnn.atomic import temporary_prefix, write_error
from streamnn.pack.decode import (DEFAULT_MAX_FILE_SIZE, DEFAULT_MAX_PIXELS, decode_kwargs, decode_options, parse_size,
                     signals_deferred)
from streamnn.errors import StreamnnError
from streamnn.paths import path_text
from streamnn.pack.worker import LEN, WORKER_BOOT, ChunkResult, decode_chunk, decode_result, encode_request, pixel_sums
from streamnn.rng import make_rng
from streamnn.data.format import COMPRESSIONS, FORMAT, STORE_DTYPES
from streamnn.data.writer import StoreWriter

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temporary files are then only judged by age
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

KAGGLE_SPLITS = {"training_set": "train", "test_set": "test"}
SPLIT_HINTS = frozenset({"training_set", "test_set", "train", "test", "val", "valid", "validation"})
DEFAULT_SPLIT = "train"
MAX_BATCH_ROWS = 256          # rows per write_rows call ...
MAX_BATCH_BYTES = 8 << 20     # ... and at most this many float32 bytes per batch
MAX_CHUNK_IMAGES = 32         # images per pool task (<= 257: their pixel sums travel as uint32) ...
MAX_CHUNK_BYTES = 2 << 20     # ... and at most this many uint8 bytes per task result
WINDOW_PER_WORKER = 4         # tasks in flight per worker


# -- scanning -------------------------------------------------------------------------------
def natural_key(text: str) -> tuple:
    """Sort key: digit runs compare as numbers, the rest case-insensitively (cat.2 < cat.10)."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), text


def is_hidden(name: str) -> bool:
    """Names that are ignored silently: dot files and folders, and ``__MACOSX``."""
    return name.startswith(".") or name == "__MACOSX"


@dataclass
class SourcePlan:
    """What :func:`scan_source` found: files per split (natural order) with labels."""

    root: Path
    layout: str                                   # "splits" or "classes"
    class_names: list[str]
    files: dict[str, list[tuple[str, int]]]       # split -> [(path relative to root, label)]
    split_folders: dict[str, str]                 # split -> folder (relative to root)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored_hidden: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        return sum(len(v) for v in self.files.values())

    @property
    def stats_split(self) -> str:
        return DEFAULT_SPLIT if DEFAULT_SPLIT in self.files else sorted(self.files)[0]


class _Lister:
    """Lists folders under SRC and applies the folder-link rule (see the module docstring),
    deciding each link once and remembering the ones not followed."""

    def __init__(self, src: Path) -> None:
        self.real_src = os.path.realpath(src)
        self.followed: list[str] = []            # resolved targets of the folder links followed
        self.decided: dict[str, str | None] = {}  # link path -> None (followed) or why not
        self.hidden_in: dict[str, int] = {}       # folder -> hidden entries (each folder counted once)

    @property
    def hidden(self) -> int:
        return sum(self.hidden_in.values())

    def link_refusal(self, link: str) -> str | None:
        """Why the folder link ``link`` is not followed, or None to follow it."""
        if link not in self.decided:
            target, why = os.path.realpath(link), None
            if _within(target, self.real_src):
                why = "folder link not followed: it leads back into SRC"
            elif _within(self.real_src, target):
                why = "folder link not followed: it leads to a folder holding SRC (a loop)"
            elif any(_within(target, t) or _within(t, target) for t in self.followed):
                why = "folder link not followed: it leads into (or above) a folder already reached by a link"
            else:
                self.followed.append(target)
            self.decided[link] = why
        return self.decided[link]

    def entries(self, folder: str) -> tuple[list[str], list[str]]:
        """Names of the visible subfolders and files of ``folder`` (sorted); hidden entries are
        counted, folder links not followed are left out (see :meth:`refused`)."""
        dirs, files, hidden = [], [], 0
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if is_hidden(e.name):
                        hidden += 1
                    elif e.is_dir():
                        if not (e.is_symlink() and self.link_refusal(e.path)):
                            dirs.append(e.name)
                    else:
                        files.append(e.name)
        except OSError as exc:
            raise StreamnnError(f"cannot list folder ({exc.strerror})", path_text(folder)) from None
        self.hidden_in[folder] = hidden
        return sorted(dirs), sorted(files)

    def walk_files(self, folder: str, prefix: str) -> list[str]:
        """``prefix/...`` paths of all visible files under ``folder``, recursively. Plain
        strings: this runs once per file of the dataset."""
        found, todo = [], [(folder, prefix)]
        while todo:
            here, head = todo.pop()
            dirs, files = self.entries(here)
            found += [f"{head}/{f}" for f in files]
            todo += [(os.path.join(here, d), f"{head}/{d}") for d in reversed(dirs)]
        return found

    def refused(self, root: Path) -> list[tuple[str, str]]:
        """(path relative to ``root``, reason) of every folder link not followed."""
        base = os.fspath(root)
        return [(path_text(Path(os.path.relpath(link, base)).as_posix()), why)
                for link, why in sorted(self.decided.items()) if why is not None]


def _unwrap(lister: _Lister, folder: Path, same_name: bool) -> Path:
    """Descend through folders that hold nothing visible but one subfolder (download nesting);
    return the folder reached."""
    for _ in range(3):
        dirs, files = lister.entries(os.fspath(folder))
        if files or len(dirs) != 1:
            break
        inner = folder / dirs[0]
        if same_name and inner.name != folder.name:
            break
        if not same_name:
            sub_dirs, sub_files = lister.entries(os.fspath(inner))
            if sub_files or not sub_dirs or inner.name in SPLIT_HINTS:
                break
        folder = inner
    return folder


def _class_list(classes: Sequence[str], present: list[str], src: Path) -> list[str]:
    """The ``classes`` asked for, each once, named as the class folders are (path_text form)."""
    names: list[str] = []
    for given in classes:
        name = given.strip()
        if not name:
            raise StreamnnError(f"empty class name in classes {','.join(map(path_text, classes))!r}")
        if name not in present and path_text(name) in present:
            name = path_text(name)
        if name in names:
            raise StreamnnError(f"class {name!r} is given twice in classes")
        names.append(name)
    missing = [c for c in names if c not in present]
    if missing:
        raise StreamnnError(f"class {', '.join(map(repr, missing))} not found (class folders: "
                            f"{', '.join(present)})", path_text(src))
    return names


def scan_source(src: str | os.PathLike, *, classes: Sequence[str] | None = None,
                per_class: int | None = None) -> SourcePlan:
    """Find splits, classes and files under ``src``; raise :class:`StreamnnError` on a bad layout."""
    src = Path(src)
    where = path_text(src)
    if not src.exists():
        raise StreamnnError("no such folder", where)
    if not src.is_dir():
        raise StreamnnError("not a folder (expected a folder of class folders, or of training_set/test_set)", where)
    lister = _Lister(src)
    root = _unwrap(lister, src, same_name=False)
    dirs, _ = lister.entries(os.fspath(root))
    if not dirs:
        raise StreamnnError("no class folders (expected SRC/<class>/<image> or "
                            "SRC/training_set/<class>/<image>)", where)
    listings = [lister.entries(os.fspath(root / d)) for d in dirs]
    splits_layout = (any(d in SPLIT_HINTS for d in dirs)
                     or all(sub_dirs and not sub_files for sub_dirs, sub_files in listings))
    split_dirs: dict[str, Path] = {}
    if splits_layout:
        for d in dirs:
            name = path_text(KAGGLE_SPLITS.get(d, d))
            if name in split_dirs:
                raise StreamnnError(f"folders {path_text(split_dirs[name].name)!r} and {path_text(d)!r} are both "
                                    f"split {name!r}", path_text(root))
            if name in ("stats", "skipped"):
                raise StreamnnError(f"split folder name {d!r} is reserved; rename it", path_text(root / d))
            split_dirs[name] = _unwrap(lister, root / d, same_name=True)
    else:
        split_dirs[DEFAULT_SPLIT] = root

    found: dict[str, dict[str, list[str]]] = {}
    skipped: list[tuple[str, str]] = []
    for split, folder in sorted(split_dirs.items()):
        class_dirs, loose = lister.entries(os.fspath(folder))
        base = _rel(folder, root)
        skipped += [(path_text(f"{base}/{f}" if base else f), "not inside a class folder") for f in loose]
        if not class_dirs:
            raise StreamnnError(f"split {split!r} has no class folders", path_text(folder))
        found[split] = {}
        for d in class_dirs:
            files = lister.walk_files(os.fspath(folder / d), f"{base}/{d}" if base else d)
            found[split][path_text(d)] = sorted(files, key=natural_key)
    skipped += lister.refused(root)

    present = sorted({c for per in found.values() for c in per})
    warnings: list[str] = []
    if classes:
        class_names = _class_list(classes, present, src)
        extra = [c for c in present if c not in class_names]
        if extra:
            warnings.append(f"class folders not in --classes, left out: {', '.join(extra)}")
    else:
        class_names = present
    files: dict[str, list[tuple[str, int]]] = {}
    for split, per in found.items():
        items: list[tuple[str, int]] = []
        for label, name in enumerate(class_names):
            paths = per.get(name, [])
            if per_class is not None:
                paths = paths[:per_class]
            if not paths:
                warnings.append(f"split {split!r} has no files of class {name!r}")
            items += [(p, label) for p in paths]
        files[split] = items
    if not any(files.values()):
        raise StreamnnError("no files in any class folder", where)
    return SourcePlan(root=root, layout="splits" if splits_layout else "classes", class_names=class_names,
                      files=files, split_folders={s: path_text(_rel(d, root)) or "." for s, d in split_dirs.items()},
                      skipped=skipped, ignored_hidden=lister.hidden, warnings=warnings)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else ""


# -- statistics ------------------------------------------------------------------------------
class RunningMoments:
    """Per-feature mean and variance of uint8 pixels / 255, from exact integer sums.

    The sums of x and x**2 (x uint8) and the row count are integers, accumulated exactly in
    int64 (overflow-free below 1.4e14 rows); the results are computed once at the end,
    ``mean = s1 / (255 n)`` and ``var = (n s2 - s1**2) / (255**2 n**2)`` with the numerator
    in Python integers (no cancellation, one rounding). So they do not depend on how the
    rows were cut into batches, in which order they were added, or on how many processes
    (or MPI ranks, adding up their ``n``, ``s1``, ``s2``) summed them. Workers compute the sums of
    their chunks (:func:`pixel_sums`); this process only adds.
    """

    def __init__(self, n_features: int) -> None:
        self.n = 0
        self.s1 = np.zeros(n_features, np.int64)
        self.s2 = np.zeros(n_features, np.int64)

    def add_sums(self, n: int, s1: np.ndarray, s2: np.ndarray) -> None:
        """Add a batch given by its row count and exact integer sums of x and x**2 (x uint8)."""
        self.n += int(n)
        self.s1 += s1.astype(np.int64)
        self.s2 += s2.astype(np.int64)

    def update(self, rows: np.ndarray) -> None:
        """Add uint8 rows (B, D)."""
        self.add_sums(len(rows), *pixel_sums(rows))

    @property
    def mean(self) -> np.ndarray:
        return self.s1 / (255.0 * max(self.n, 1))

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0), as ``np.std``."""
        n = max(self.n, 1)
        num = n * self.s2.astype(object) - self.s1.astype(object) ** 2  # exact integers
        return np.sqrt((num / (65025 * n * n)).astype(np.float64))


# -- decoding workers --------------------------------------------------------------------------
class _Worker:
    """One decoding process and its two pipes, with the bytes not yet sent or parsed."""

    def __init__(self, env: dict[str, str], kwargs: dict[str, Any]) -> None:
        req_r, self.send_fd = os.pipe()
        self.recv_fd, res_w = os.pipe()
        cmd = [sys.executable, "-c", WORKER_BOOT, str(req_r), str(res_w), str(os.getpid())]
        # Started with SIGINT and SIGTERM blocked (the mask is inherited through exec): a
        # Ctrl-C sent to the whole process group never interrupts a worker's start-up.
        try:
            with signals_deferred():
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             pass_fds=(req_r, res_w), env=env)
        except BaseException:
            os.close(self.send_fd)
            os.close(self.recv_fd)
            raise
        finally:
            os.close(req_r)
            os.close(res_w)
        for fd in (self.send_fd, self.recv_fd):
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # Linux: fewer, larger reads
        os.set_blocking(self.send_fd, False)
        config = json.dumps(kwargs).encode()
        self.outbox = bytearray(LEN.pack(len(config)) + config)  # the first frame: the decoding options
        self.inbox = bytearray()
        self.ready = False
        self.in_flight = 0

    def has_frame(self) -> bool:
        """Whether a complete frame has been received."""
        return len(self.inbox) >= LEN.size and len(self.inbox) >= LEN.size + LEN.unpack_from(self.inbox)[0]

    def frame(self) -> bytes | None:
        """The next complete frame received, if any."""
        if not self.has_frame():
            return None
        n = LEN.unpack_from(self.inbox)[0]
        data = bytes(self.inbox[LEN.size:LEN.size + n])
        del self.inbox[:LEN.size + n]
        return data

    def end_requests(self) -> None:
        """Close the request pipe (once): the worker ends after the requests it has."""
        if self.send_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.send_fd)
            self.send_fd = -1

    def close(self, kill: bool) -> None:
        """End the process (at once if ``kill``, else at the end of its requests) and reap it."""
        self.end_requests()
        if kill:
            with contextlib.suppress(OSError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=None if kill else 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            with contextlib.suppress(OSError):
                os.close(self.recv_fd)


class _Decoder:
    """Decodes chunks of files and yields the results in submission order.

    One worker: in-process. More: this process and ``workers - 1`` worker processes
    (:func:`streamnn.pack.worker.worker_main`, started with ``subprocess``: no fork of this
    process, no multiprocessing machinery, no pickle), each fed at most ``WINDOW_PER_WORKER``
    chunks, so memory stays flat. This process decodes a chunk itself whenever no worker can
    take it (all busy, or none started yet: a start takes ~0.2 s, it imports NumPy and
    OpenCV), after taking in every result that is ready, so the workers never wait for it:
    one worker start-up and one hand-off fewer than ``workers`` processes (measured with
    ``tools/bench_pack.py``: 2 workers on 2 cores spent ~20% more CPU per image than
    decoding in-process, mostly the start-ups). Workers die with this process: on exit they are killed (error or Ctrl-C) or
    stopped after their last request and reaped; if this process is killed, Linux kills
    them (``PR_SET_PDEATHSIG``) and elsewhere their request pipe ends.
    """

    decode_while_booting = True  # this process decodes too; tests turn it off to force every chunk
    #                              through ``workers`` worker processes

    def __init__(self, workers: int, kwargs: dict[str, Any]) -> None:
        self.kwargs, self.workers = kwargs, []
        self._threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # this process decodes too (alone, or while the workers start)
        if workers > 1 and (not sys.executable or os.name != "posix"):
            log.warning("worker processes need a POSIX system and a Python executable; decoding in-process")
            workers = 1
        if workers > 1:
            package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
            try:
                for _ in range(workers - 1 if self.decode_while_booting else workers):
                    self.workers.append(_Worker(env, kwargs))
            except BaseException:
                self._close(failed=True)
                raise

    def _pump(self, until: Callable[[], bool] | None) -> None:
        """Send what is queued and take in what has arrived: one pass that does not block, or
        blocking passes until ``until()`` holds. A worker that dies is an error."""
        while until is None or not until():
            readers = [w for w in self.workers if w.in_flight or not w.ready]
            writers = [w for w in self.workers if w.outbox]
            r, wr, _ = select.select([w.recv_fd for w in readers], [w.send_fd for w in writers], [],
                                     0 if until is None else None)
            for w in writers:
                if w.send_fd in wr:
                    try:
                        del w.outbox[:os.write(w.send_fd, w.outbox)]
                    except BrokenPipeError:
                        raise StreamnnError(self._broken(w)) from None
            for w in readers:
                if w.recv_fd in r:
                    data = os.read(w.recv_fd, 1 << 20)
                    if not data:
                        raise StreamnnError(self._broken(w))
                    w.inbox += data
                    if not w.ready and w.has_frame():
                        if w.frame() != b"ready":
                            raise StreamnnError(self._broken(w))
                        w.ready = True
            if until is None:
                return

    def _broken(self, w: _Worker) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(timeout=5)
        how = f"exit status {w.proc.returncode}" if w.proc.returncode is not None else "it stopped answering"
        return f"a decoding worker process died ({how})"

    def _result(self, head: _Worker | ChunkResult) -> ChunkResult:
        if isinstance(head, tuple):  # decoded here
            return head
        self._pump(until=head.has_frame)
        head.in_flight -= 1
        return decode_result(head.frame() or b"", self.kwargs)

    def map(self, chunks: Iterable[tuple[list[str], list[bool]]]) -> Iterator[ChunkResult]:
        if not self.workers:
            for chunk in chunks:
                yield decode_chunk(*chunk, self.kwargs)
            return
        pending: collections.deque[_Worker | ChunkResult] = collections.deque()  # in submission order
        for chunk in chunks:
            while True:
                self._pump(until=None)
                while pending and (isinstance(pending[0], tuple) or pending[0].has_frame()):
                    yield self._result(pending.popleft())  # what is ready: the workers' windows refill
                free = [w for w in self.workers if w.ready and w.in_flight < WINDOW_PER_WORKER]
                if free:
                    w = min(free, key=lambda w: w.in_flight)
                    payload = encode_request(*chunk)
                    w.outbox += LEN.pack(len(payload)) + payload
                    w.in_flight += 1
                    pending.append(w)
                    break
                if self.decode_while_booting and sum(isinstance(p, tuple) for p in pending) < WINDOW_PER_WORKER:
                    pending.append(decode_chunk(*chunk, self.kwargs))  # no worker can take it: decode here
                    break
                if pending:  # every worker is busy: take the oldest result
                    yield self._result(pending.popleft())
                else:
                    self._pump(until=lambda: any(w.ready for w in self.workers))
            while pending and isinstance(pending[0], tuple):
                yield pending.popleft()
        while pending:
            yield self._result(pending.popleft())

    def _close(self, failed: bool) -> None:
        cv2.setNumThreads(self._threads)
        for w in self.workers:  # first signal every process, then wait: no worker is left behind
            w.end_requests()
            if failed:
                with contextlib.suppress(OSError):
                    w.proc.kill()
        for w in self.workers:
            w.close(kill=failed)
        self.workers = []

    def close(self) -> None:
        """Let the workers finish and reap them (also done on leaving the ``with`` block)."""
        self._close(failed=False)

    def __enter__(self) -> _Decoder:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._close(failed=exc_type is not None)


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# -- output ------------------------------------------------------------------------------------
def _within(path: str, folder: str) -> bool:
    """Whether the resolved ``path`` is ``folder`` or lies under it (both resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_store_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file holding a streamnn store (by content: the HDF5 root
    attribute ``format``), without following a symlink and without blocking on a FIFO."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode) or not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
        return (fmt.decode() if isinstance(fmt, bytes) else fmt) == FORMAT
    except (OSError, RuntimeError, KeyError, ValueError, UnicodeError):
        return False


def _check_output(out: Path, src: Path, force: bool) -> None:
    """Refuse, before anything is written, an output that would destroy what is not ours (see
    the module docstring)."""
    where = path_text(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise StreamnnError("output folder does not exist", path_text(folder))
    real_out = os.path.join(os.path.realpath(folder), out.name)
    if _within(real_out, os.path.realpath(src)):
        raise StreamnnError(f"lies inside SRC {path_text(src)}; write the store outside the image folders", where)
    try:
        mode: int | None = os.lstat(out).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise StreamnnError(f"cannot check the output ({exc.strerror})", where) from None
    if mode is not None:
        if stat.S_ISLNK(mode):
            raise StreamnnError("is a symbolic link; refusing to replace it (give the path of the file itself)", where)
        if stat.S_ISDIR(mode):
            raise StreamnnError("is a folder; give a file name for the store", where)
        if not stat.S_ISREG(mode):
            raise StreamnnError("is not a regular file (a device, FIFO or socket); refusing to replace it", where)
        if not force:
            raise StreamnnError("already exists (use --force to replace an earlier streamnn store)", where)
        if not is_store_file(out):
            raise StreamnnError("exists and is not a readable streamnn store; --force only replaces a store "
                                "(move or delete the file yourself if it may go)", where)


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """A failed write of the store (disk full, read-only folder, I/O error; h5py raises OSError
    or RuntimeError with the errno inside its message) becomes the OSError ``OUT: <meaning>``."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        raise write_error(exc, path_text(out)) from None


def _stale_temps(out: Path) -> Iterator[Path]:
    """Temporary files beside ``out`` named as :mod:`streamnn.atomic` names those of ``out``:
    the store's, and the one its compaction writes beside that."""
    folder = out.parent if str(out.parent) else Path(".")
    inner = temporary_prefix(out.name)
    mine = (inner, temporary_prefix(inner)[:-1])
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(mine):
                yield folder / name


def remove_stale_temps(out: Path, older_than: float) -> list[Path]:
    """Delete temporary files of earlier runs writing ``out`` that were killed (SIGKILL, power loss).

    A temporary file is removed only if it is a regular file (never through a symlink) that
    was last modified before ``older_than`` (a time stamp) and that nobody holds the HDF5 lock
    of, so the files of a concurrent run stay.
    """
    removed = []
    for tmp in _stale_temps(out):
        with contextlib.suppress(OSError):
            fd = os.open(tmp, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_mtime >= older_than:
                    continue
                if fcntl is not None:  # HDF5 holds a lock on files it has open
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                tmp.unlink()
                removed.append(tmp)
            finally:
                os.close(fd)
    return removed


# -- packing -----------------------------------------------------------------------------------
@dataclass
class PackResult:
    """What :func:`pack` wrote: counts, skipped files, size and speed."""

    out: Path
    class_names: list[str]
    image_shape: tuple[int, int, int]
    counts: dict[str, dict[str, int]]
    skipped: list[tuple[str, str]]
    ignored_hidden: int
    warnings: list[str]
    seconds: float
    size_bytes: int
    fingerprint: str
    stale_removed: list[Path] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    @property
    def images_per_second(self) -> float:
        return (self.n_images + len(self.skipped)) / max(self.seconds, 1e-9)

    def summary(self, max_skipped: int = 20) -> str:
        """A human-readable report: counts per split and class, skipped files, size, speed."""
        h, w, c = self.image_shape
        lines = [f"Wrote {path_text(self.out)} ({_human_bytes(self.size_bytes)}): {self.n_images} images of "
                 f"{h}x{w}x{c} in {self.seconds:.1f} s ({self.images_per_second:.0f} images/s)"]
        width = max(5, *(len(n) for n in self.class_names))
        lines.append("  " + "split".ljust(10) + "".join(n.rjust(width + 2) for n in self.class_names)
                     + "total".rjust(9))
        for split, per in self.counts.items():
            lines.append("  " + split.ljust(10) + "".join(str(per[n]).rjust(width + 2) for n in self.class_names)
                         + str(sum(per.values())).rjust(9))
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} file(s):")
            lines += [f"  {p}: {r}" for p, r in self.skipped[:max_skipped]]
            if len(self.skipped) > max_skipped:
                lines.append(f"  ... and {len(self.skipped) - max_skipped} more (streamnn-info lists them all)")
        if self.ignored_hidden:
            lines.append(f"Ignored {self.ignored_hidden} hidden file(s)/folder(s) (.* and __MACOSX)")
        lines += [f"Warning: {w}" for w in self.warnings]
        if self.stale_removed:
            lines.append(f"Removed {len(self.stale_removed)} stale temporary file(s) of killed runs")
        return "\n".join(lines)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _chunks(items: Sequence[tuple[str, str, int]], root: Path, size: int,
            stats_split: str) -> Iterator[tuple[list[str], list[bool]]]:
    """(absolute paths, counts-for-statistics flags) per chunk of ``size`` items."""
    base = os.fspath(root)
    for i in range(0, len(items), size):
        part = items[i:i + size]
        yield [os.path.join(base, rel) for _, rel, _ in part], [split == stats_split for split, _, _ in part]


class _RowSink:
    """Collects decoded images into batches and writes them, split by split."""

    def __init__(self, writer: StoreWriter, image_shape: tuple[int, int, int]) -> None:
        rows = max(1, min(MAX_BATCH_ROWS, MAX_BATCH_BYTES // (4 * int(np.prod(image_shape)))))
        self.writer = writer
        self.buf = np.empty((rows, *image_shape), np.uint8)
        self.split: str | None = None
        self.labels: list[int] = []
        self.paths: list[str] = []
        self.rows = 0

    def add(self, split: str, image: np.ndarray, label: int, path: str) -> None:
        if split != self.split or len(self.labels) == len(self.buf):
            self.flush()
            self.split = split
        self.buf[len(self.labels)] = image
        self.labels.append(label)
        self.paths.append(path)

    def flush(self) -> None:
        n = len(self.labels)
        if n and self.split is not None:
            self.writer.write_rows(self.split, self.buf[:n], self.labels, self.paths)
            self.rows += n
        self.labels, self.paths = [], []


@dataclass
class PackJob:
    """Everything decided before decoding (the scan, the row order, options, sizes), and the
    steps every way of packing shares: a writer for some of the rows, decoding rows into it,
    the skip checks, the result. :func:`pack` runs it into one file, :mod:`streamnn.pack.sharded`
    into shards."""

    src: Path
    out: Path
    plan: SourcePlan
    items: list[tuple[str, str, int]]   # (split, relative path, label) in row order
    options: dict[str, Any]
    image_shape: tuple[int, int, int]
    chunk: int                          # images per decoding task
    workers: int
    store_kwargs: dict[str, Any]        # StoreWriter arguments besides the path
    max_skip_fraction: float
    t0: float
    stale: list[Path] = field(default_factory=list)
    done: int = 0                       # files processed (for progress)

    @property
    def total(self) -> int:
        return len(self.items) + len(self.plan.skipped)

    @property
    def n_features(self) -> int:
        return int(np.prod(self.image_shape))

    def check_skips(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Fail once more files are skipped than ``max_skip_fraction`` allows (of all files)."""
        if len(skipped) > math.floor(self.max_skip_fraction * self.total + 1e-9):
            first = min(skipped)
            raise StreamnnError(f"{len(skipped)} of {self.total} files could not be packed, more than "
                                f"max-skip-fraction {self.max_skip_fraction:g} allows (first: "
                                f"{first[0]}: {first[1]}); nothing written", path_text(self.src))

    def check_usable(self, rows: int, skipped: Sequence[tuple[str, str]]) -> None:
        if rows == 0:
            first = min(skipped)
            raise StreamnnError(f"no usable image ({len(skipped)} files skipped; first: "
                                f"{first[0]}: {first[1]}); nothing written", path_text(self.src))

    def start(self, stack: contextlib.ExitStack, outputs: Sequence[tuple[Path, Sequence[tuple[str, str, int]],
                                                                         dict[str, Any]]]
              ) -> tuple[_Decoder, list[StoreWriter]]:
        """The decoder and a store writer per output (path, its items, options added), each
        with room for its items in every split, registered on ``stack`` with signals
        deferred, so that a Ctrl-C finds the workers and the temporary files registered."""
        with signals_deferred():
            decoder = stack.enter_context(_Decoder(self.workers, decode_kwargs(self.options)))
            writers = [stack.enter_context(StoreWriter(path, **self.store_kwargs, options={**self.options, **extra}))
                       for path, _, extra in outputs]
        for writer, (_, items, _) in zip(writers, outputs):
            sizes = collections.Counter(split for split, _, _ in items)
            for split in sorted(self.plan.files):
                writer.add_split(split, sizes[split])
        return decoder, writers

    def decode_into(self, writer: StoreWriter, items: Sequence[tuple[str, str, int]], decoder: _Decoder,
                    moments: RunningMoments, skipped: list[tuple[str, str]],
                    progress: Callable[[int, int], None] | None) -> int:
        """Decode ``items`` in order and append them to ``writer``; add the statistics split's
        pixels to ``moments`` and failures to ``skipped``. Returns the rows written."""
        sink, done = _RowSink(writer, self.image_shape), 0
        for images, reasons, sums in decoder.map(_chunks(items, self.plan.root, self.chunk, self.plan.stats_split)):
            if sums is not None:
                moments.add_sums(*sums)
            decoded = iter(images)
            for (split, rel, label), reason in zip(items[done:done + len(reasons)], reasons):
                if reason is None:
                    sink.add(split, next(decoded), label, path_text(rel))
                else:
                    skipped.append((path_text(rel), reason))
            done += len(reasons)
            self.done += len(reasons)
            self.check_skips(skipped)
            if progress is not None:
                progress(self.done, self.total)
        sink.flush()
        return sink.rows

    def result(self, skipped: list[tuple[str, str]], fingerprint: str, size_bytes: int) -> PackResult:
        counts: dict[str, dict[str, int]] = {s: {c: 0 for c in self.plan.class_names} for s in sorted(self.plan.files)}
        failed = {p for p, _ in skipped}
        for split, rel, label in self.items:
            if path_text(rel) not in failed:
                counts[split][self.plan.class_names[label]] += 1
        return PackResult(out=self.out, class_names=self.plan.class_names, image_shape=self.image_shape,
                          counts=counts, skipped=skipped, ignored_hidden=self.plan.ignored_hidden,
                          warnings=self.plan.warnings, seconds=time.perf_counter() - self.t0,
                          size_bytes=size_bytes, fingerprint=fingerprint, stale_removed=self.stale)


def prepare_pack(src: str | os.PathLike, out: str | os.PathLike, *, size: int | str | tuple[int, int] = 64,
                 per_class: int | None = None, classes: Sequence[str] | None = None, dtype: str = "float32",
                 compression: str | None = None, seed: int = 0, workers: int | None = None, force: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_skip_fraction: float = 0.1, grayscale: bool = False,
                 exif_orientation: bool = True, reduced_decoding: bool = True, command: str | None = None,
                 max_file_size: int = DEFAULT_MAX_FILE_SIZE, plan: SourcePlan | None = None) -> PackJob:
    """Check the arguments and the output, scan ``src`` (unless its ``plan`` is given: MPI
    ranks other than 0 get it from rank 0) and draw the row order: a :class:`PackJob`."""
    t0, wall0 = time.perf_counter(), time.time()
    hw = parse_size(size)
    _check_arguments(dtype, compression, per_class, max_skip_fraction, max_pixels, max_file_size)
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise StreamnnError(f"workers must be at least 1, not {workers}")
    out = Path(out)
    stale: list[Path] = []
    if plan is None:
        plan = scan_source(src, classes=classes, per_class=per_class)
        _check_output(out, Path(src), force)
        for warning in plan.warnings:
            log.warning(warning)
        stale = remove_stale_temps(out, older_than=wall0)

    rng = make_rng(seed)
    items: list[tuple[str, str, int]] = []  # (split, relative path, label) in row order
    for split in sorted(plan.files):
        files = plan.files[split]
        items += [(split, *files[i]) for i in rng.permutation(len(files))]
    options = {**decode_options(hw, grayscale=grayscale, max_pixels=int(max_pixels), max_file_size=int(max_file_size),
                                exif_orientation=exif_orientation, reduced=reduced_decoding),
               "source_root": path_text(plan.root.resolve()), "layout": plan.layout,
               "split_folders": plan.split_folders, "classes": plan.class_names if classes else None,
               "per_class": per_class, "file_order": "natural sort", "dtype": dtype, "compression": compression,
               "seed": seed, "max_skip_fraction": max_skip_fraction, "stats_split": plan.stats_split,
               "stats": "mean and population std (ddof=0) of uint8/255 from exact integer sums",
               "ignored_hidden": plan.ignored_hidden, "warnings": plan.warnings}
    if command is None:
        command = f"streamnn.pack.job.pack({path_text(src)!r}, {path_text(out)!r}, size={hw}, dtype={dtype!r}, seed={seed})"
    image_shape = (hw[0], hw[1], 1 if grayscale else 3)
    chunk = max(1, min(MAX_CHUNK_IMAGES, MAX_CHUNK_BYTES // int(np.prod(image_shape))))
    job = PackJob(src=Path(src), out=out, plan=plan, items=items, options=options, image_shape=image_shape,
                  chunk=chunk, workers=min(workers, max(1, math.ceil(len(items) / chunk))),
                  store_kwargs={"class_names": plan.class_names, "image_shape": image_shape, "dtype": dtype,
                                "compression": compression, "channel_order": "GRAY" if grayscale else "BGR",
                                "command": command},
                  max_skip_fraction=max_skip_fraction, t0=t0, stale=stale, done=len(plan.skipped))
    job.check_skips(plan.skipped)
    return job


def pack(src: str | os.PathLike, out: str | os.PathLike, *, progress: Callable[[int, int], None] | None = None,
         **kwargs: Any) -> PackResult:
    """Pack the image tree ``src`` into the store ``out``; see the module docstring for the rules.

    Keyword arguments are those of :func:`prepare_pack`: ``size`` (a side, ``"HxW"`` or
    ``(H, W)``), ``per_class``, ``classes``, ``dtype``, ``compression``, ``seed``, ``workers``,
    ``force``, ``max_pixels``, ``max_file_size``, ``max_skip_fraction``, ``grayscale``,
    ``exif_orientation``, ``reduced_decoding``, ``command``. ``progress(done, total)`` is
    called as files are processed. Raises :class:`StreamnnError` (nothing written, a previous
    ``out`` untouched) on bad arguments or layout, an existing ``out`` without ``force``, too
    many skipped files, or no usable image.
    """
    job = prepare_pack(src, out, **kwargs)
    skipped = list(job.plan.skipped)
    moments = RunningMoments(job.n_features)
    with _writing(job.out), contextlib.ExitStack() as stack:
        decoder, (writer,) = job.start(stack, [(job.out, job.items, {})])
        rows = job.decode_into(writer, job.items, decoder, moments, skipped, progress)
        job.check_usable(rows, skipped)
        if moments.n:
            writer.set_stats(moments.mean, moments.std)
        skipped.sort()
        writer.set_skipped(skipped)
        decoder.close()  # the workers are gone before the store appears: nothing is left to do after
        fingerprint = writer.commit()
    return job.result(skipped, fingerprint, job.out.stat().st_size)


def _check_arguments(dtype: str, compression: str | None, per_class: int | None, max_skip_fraction: float,
                     max_pixels: int, max_file_size: int) -> None:
    if dtype not in STORE_DTYPES:
        raise StreamnnError(f"unknown dtype {dtype!r} (choose from {', '.join(STORE_DTYPES)})")
    if compression not in COMPRESSIONS:
        raise StreamnnError(f"unknown compression {compression!r} (choose lzf or gzip)")
    if per_class is not None and per_class < 1:
        raise StreamnnError(f"per_class must be at least 1, not {per_class}")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise StreamnnError(f"max_skip_fraction must be between 0 and 1, not {max_skip_fraction}")
    if max_pixels < 1:
        raise StreamnnError(f"max_pixels must be positive, not {max_pixels}")
    if max_file_size < 1:
        raise StreamnnError(f"max_file_size must be positive, not {max_file_size}")
