"""Pack an image folder tree into a streamnn store (see :mod:`streamnn.store` for the format).

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
that do not decode (see :mod:`streamnn.decode`) are skipped and listed with their reason,
as are files lying in a split folder outside any class folder. If more than
``max_skip_fraction`` of the candidates are skipped, or none decodes, packing fails and
nothing is written.

*Order.* Each split's rows are a permutation of its files drawn from ``make_rng(seed)``
(splits in sorted name order), so classes are interleaved and contiguous reads are mixed;
``paths`` keeps each row's source. Decoding happens in a process pool (``workers``; 1 means
in-process) fed a bounded window of chunks and read back in submission order, so the output
does not depend on the number of workers and memory does not grow with the dataset.

*Statistics.* Per-feature mean and (population, ddof=0) std of the normalized pixels
(uint8 / 255, whatever ``dtype`` stores) of split ``train``, or of the first split in
sorted order when there is no ``train`` (recorded as ``options.stats_split``). Workers
return exact integer pixel sums per chunk; this process adds them up exactly and rounds
once at the end (see :class:`RunningMoments`), so the results depend neither on ``workers``
nor on how the rows are cut into chunks or shards.

*Processes and failure.* Workers start with ``forkserver`` (``spawn`` where that is
missing): forking a parent whose OpenCV thread pool has run deadlocks the child. Like any
spawn-style pool, a *script* calling :func:`pack` with ``workers > 1`` needs the
``if __name__ == "__main__":`` guard; a worker that dies makes packing fail with a message
instead of hanging. Output goes through :class:`~streamnn.store.StoreWriter`: on any error
or Ctrl-C (SIGINT; the CLI maps SIGTERM to it) the pool is terminated and the temporary file
removed, and a previous store stays as it was. A SIGKILLed run cannot clean up its
``.streamnn-tmp-*`` file; the next run writing the same output removes it.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .atomic import TMP_PREFIX
from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_kwargs, decode_options, load_image, parse_size
from .errors import StreamnnError
from .rng import make_rng
from .store import COMPRESSIONS, DTYPES, StoreWriter

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


def _entries(folder: Path) -> tuple[list[Path], list[Path], int]:
    """Visible subfolders and files of ``folder`` (sorted) and the number of hidden entries."""
    dirs, files, hidden = [], [], 0
    try:
        with os.scandir(folder) as it:
            for e in it:
                if is_hidden(e.name):
                    hidden += 1
                elif e.is_dir():
                    dirs.append(Path(e.path))
                else:
                    files.append(Path(e.path))
    except OSError as exc:
        raise StreamnnError(f"cannot list folder ({exc.strerror})", folder) from None
    return sorted(dirs), sorted(files), hidden


def _walk_files(folder: Path, prefix: str) -> tuple[list[str], int]:
    """``prefix/...`` paths of all visible files under ``folder`` (recursively), and the
    number of hidden entries. Plain strings: this runs once per file of the dataset."""
    found, hidden, base = [], 0, os.fspath(folder)
    for here, dirs, files in os.walk(base):
        hidden += sum(is_hidden(n) for n in dirs) + sum(is_hidden(n) for n in files)
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        sub = os.path.relpath(here, base)
        head = prefix if sub == "." else f"{prefix}/{Path(sub).as_posix()}"
        found += [f"{head}/{f}" for f in files if not is_hidden(f)]
    return found, hidden


def _unwrap(folder: Path, same_name: bool) -> tuple[Path, int]:
    """Descend through folders that hold nothing visible but one subfolder (download nesting);
    return the folder reached and the hidden entries passed on the way."""
    hidden = 0
    for _ in range(3):
        dirs, files, h = _entries(folder)
        if files or len(dirs) != 1:
            break
        inner = dirs[0]
        if same_name and inner.name != folder.name:
            break
        if not same_name:
            sub_dirs, sub_files, _ = _entries(inner)
            if sub_files or not sub_dirs or inner.name in SPLIT_HINTS:
                break
        folder, hidden = inner, hidden + h
    return folder, hidden


def scan_source(src: str | os.PathLike, *, classes: Sequence[str] | None = None,
                per_class: int | None = None) -> SourcePlan:
    """Find splits, classes and files under ``src``; raise :class:`StreamnnError` on a bad layout."""
    src = Path(src)
    if not src.exists():
        raise StreamnnError("no such folder", src)
    if not src.is_dir():
        raise StreamnnError("not a folder (expected a folder of class folders, or of training_set/test_set)", src)
    root, hidden = _unwrap(src, same_name=False)
    dirs, _, root_hidden = _entries(root)
    if not dirs:
        raise StreamnnError("no class folders (expected SRC/<class>/<image> or "
                            "SRC/training_set/<class>/<image>)", src)
    listings = [_entries(d) for d in dirs]
    splits_layout = (any(d.name in SPLIT_HINTS for d in dirs)
                     or all(sub_dirs and not sub_files for sub_dirs, sub_files, _ in listings))
    split_dirs: dict[str, Path] = {}
    if splits_layout:
        hidden += root_hidden  # (in the class layout, root is the split folder, counted below)
        for d in dirs:
            name = KAGGLE_SPLITS.get(d.name, d.name)
            if name in split_dirs:
                raise StreamnnError(f"folders {split_dirs[name].name!r} and {d.name!r} are both split {name!r}", root)
            if name in ("stats", "skipped"):
                raise StreamnnError(f"split folder name {d.name!r} is reserved; rename it", d)
            split_dirs[name], h = _unwrap(d, same_name=True)
            hidden += h
    else:
        split_dirs[DEFAULT_SPLIT] = root

    found: dict[str, dict[str, list[str]]] = {}
    skipped: list[tuple[str, str]] = []
    for split, folder in sorted(split_dirs.items()):
        class_dirs, loose, h = _entries(folder)
        hidden += h
        skipped += [(_rel(f, root), "not inside a class folder") for f in loose]
        if not class_dirs:
            raise StreamnnError(f"split {split!r} has no class folders", folder)
        found[split] = {}
        for d in class_dirs:
            files, h = _walk_files(d, _rel(d, root))
            hidden += h
            found[split][d.name] = sorted(files, key=natural_key)

    present = sorted({c for per in found.values() for c in per})
    warnings: list[str] = []
    if classes:
        class_names = list(dict.fromkeys(c.strip() for c in classes if c.strip()))
        missing = [c for c in class_names if c not in present]
        if missing:
            raise StreamnnError(f"class {', '.join(map(repr, missing))} not found (class folders: "
                                f"{', '.join(present)})", src)
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
        raise StreamnnError("no files in any class folder", src)
    return SourcePlan(root=root, layout="splits" if splits_layout else "classes", class_names=class_names,
                      files=files, split_folders={s: _rel(d, root) or "." for s, d in split_dirs.items()},
                      skipped=skipped, ignored_hidden=hidden, warnings=warnings)


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
    (or MPI ranks, :meth:`add` / :meth:`arrays`) summed them. Workers compute the sums of
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


def pixel_sums(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-feature sums of x and x**2 over uint8 rows (B, D), as int64."""
    rows = rows.reshape(len(rows), -1)
    s1 = rows.sum(axis=0, dtype=np.int64)
    s2 = np.zeros(rows.shape[1], np.int64)
    for i in range(0, len(rows), 256):  # 256 * 255**2 < 2**32: uint32 partial sums cannot overflow
        sq = rows[i:i + 256].astype(np.uint32)
        sq *= sq
        s2 += sq.sum(axis=0, dtype=np.uint32)
    return s1, s2


# -- decoding workers --------------------------------------------------------------------------
def _init_worker(ready: Any) -> None:
    """Pool workers: leave Ctrl-C to the parent (it terminates the pool); one OpenCV thread."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cv2.setNumThreads(1)
    ready.release()


def _noop() -> None:
    return None


ChunkResult = tuple[np.ndarray, list[str | None], tuple[int, np.ndarray, np.ndarray] | None]


def decode_chunk(paths: Sequence[str], in_stats: Sequence[bool], kwargs: dict[str, Any]) -> ChunkResult:
    """Decode files. Return the stacked uint8 images that worked, a reason (or None) per file,
    and (n, sum x, sum x**2) over the decoded images flagged ``in_stats`` (None if none)."""
    images, reasons, counted = [], [], []
    for p, flag in zip(paths, in_stats):
        try:
            images.append(load_image(p, **kwargs))
            reasons.append(None)
            counted.append(flag)
        except DecodeError as exc:
            reasons.append(exc.reason)
        except MemoryError:
            reasons.append("out of memory while decoding")
    h, w = kwargs["size"]
    stack = np.stack(images) if images else np.empty((0, h, w, 1 if kwargs["grayscale"] else 3), np.uint8)
    sums = None
    if any(counted):
        chosen = stack[np.asarray(counted)]
        s1, s2 = pixel_sums(chosen)
        sums = (len(chosen), s1.astype(np.uint16), s2.astype(np.uint32))  # chunks <= 257 images: no overflow
    return stack, reasons, sums


class _Decoder:
    """Decodes chunks of files and yields the results in submission order.

    One worker: in-process. More: a process pool fed a bounded window of chunks (memory stays
    flat). The pool boots in a background thread (~0.3 s: the fork server imports NumPy and
    OpenCV once) while this process decodes the first chunks itself; on exit the pool is
    shut down, or terminated after an error or Ctrl-C, once fully started (a worker killed
    half-way through its start-up prints a traceback).
    """

    decode_while_booting = True  # tests turn it off to force every chunk through the pool

    def __init__(self, workers: int, kwargs: dict[str, Any], mp_context: str | None) -> None:
        self.kwargs, self.workers = kwargs, workers
        self.pool: ProcessPoolExecutor | None = None
        self._boot: threading.Thread | None = None
        self._boot_error: BaseException | None = None
        self._ready = threading.Event()
        self._threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # this process decodes too (alone, or while the pool boots)
        if workers > 1 and not _main_importable() and mp_context != "fork":
            log.warning("__main__ is not a file (python -?): worker processes cannot start; decoding in-process")
            self.workers = 1
        if self.workers > 1:
            ctx = multiprocessing.get_context(mp_context or default_mp_context())
            self._boot = threading.Thread(target=self._start_pool, args=(ctx,), name="streamnn-pool-boot", daemon=True)
            self._boot.start()

    def _start_pool(self, ctx: Any) -> None:
        """Start every worker and wait until each has run its initializer (boot thread)."""
        try:
            if ctx.get_start_method() == "forkserver":
                ctx.set_forkserver_preload(["streamnn.pack"])  # imported once, before the workers fork
            ready = ctx.Semaphore(0)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(ready,))
            warm = [self.pool.submit(_noop) for _ in range(self.workers)]
            started, deadline = 0, time.monotonic() + 120
            while started < self.workers:
                if ready.acquire(timeout=0.05):
                    started += 1
                elif any(f.done() and f.exception() is not None for f in warm) or time.monotonic() > deadline:
                    raise StreamnnError(_BROKEN)
        except BaseException as exc:  # reported by map() in the main thread
            self._boot_error = exc
        finally:
            self._ready.set()

    def map(self, chunks: Iterable[tuple[list[str], list[bool]]]) -> Iterator[ChunkResult]:
        chunks = iter(chunks)
        if self._boot is not None:
            if not self.decode_while_booting:
                self._ready.wait()
            while self.decode_while_booting and not self._ready.is_set():
                chunk = next(chunks, None)
                if chunk is None:
                    return
                yield decode_chunk(*chunk, self.kwargs)
            if self._boot_error is not None:
                if isinstance(self._boot_error, StreamnnError):
                    raise self._boot_error
                raise StreamnnError(f"{_BROKEN} ({self._boot_error!r})") from self._boot_error
        if self.pool is None:
            for chunk in chunks:
                yield decode_chunk(*chunk, self.kwargs)
            return
        pending: collections.deque[Future] = collections.deque()
        try:
            for chunk in chunks:
                pending.append(self.pool.submit(decode_chunk, *chunk, self.kwargs))
                if len(pending) >= WINDOW_PER_WORKER * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise StreamnnError(_BROKEN) from None

    def _close(self, failed: bool) -> None:
        cv2.setNumThreads(self._threads)
        if self._boot is not None:
            self._boot.join()  # let a booting pool finish starting before stopping it
        if self.pool is None:
            return
        if failed:  # an error or Ctrl-C: stop the workers now, not after their queue
            terminate = getattr(self.pool, "terminate_workers", None)  # Python >= 3.14
            if terminate is not None:
                terminate()
            else:  # older: stop feeding, then end the processes (a private attribute, hence the guard)
                procs = list((getattr(self.pool, "_processes", None) or {}).values())
                self.pool.shutdown(wait=False, cancel_futures=True)
                for proc in procs:
                    with contextlib.suppress(Exception):
                        proc.terminate()
        self.pool.shutdown(wait=True)

    def __enter__(self) -> _Decoder:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._close(failed=exc_type is not None)


_BROKEN = ("a decoding worker process died (crashed or could not start; a script that calls pack() "
           "must guard it with `if __name__ == '__main__':`, or use workers=1)")


def _main_importable() -> bool:
    """Spawn/forkserver workers re-import the parent's ``__main__`` by path; a program read
    from stdin (``python -``) has none, so its workers cannot start."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path is None or getattr(main, "__spec__", None) is not None or os.path.isfile(path)


def default_mp_context() -> str:
    """``forkserver`` where available (no fork of a parent that may run OpenCV threads), else ``spawn``."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# -- output ------------------------------------------------------------------------------------
def _check_output(out: Path, force: bool) -> None:
    if out.is_dir():
        raise StreamnnError("is a folder; give a file name for the store", out)
    if not out.parent.is_dir():
        raise StreamnnError("output folder does not exist", out.parent)
    if out.exists() and not force:
        raise StreamnnError("already exists (use --force to overwrite it)", out)


def remove_stale_temps(out: Path, older_than: float) -> list[Path]:
    """Delete temporary files of earlier runs writing ``out`` that were killed (SIGKILL, power loss).

    A temporary file is removed only if it was last modified before ``older_than`` (a time
    stamp) and nobody holds its HDF5 lock, so the files of a concurrent run stay.
    """
    removed = []
    for tmp in out.parent.glob(TMP_PREFIX + out.name + ".*"):
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime >= older_than:
                continue
            fd = os.open(tmp, os.O_RDWR)
            try:
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
        lines = [f"Wrote {self.out} ({_human_bytes(self.size_bytes)}): {self.n_images} images of "
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
    the skip checks, the result. :func:`pack` runs it into one file, :mod:`streamnn.shards`
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
    mp_context: str | None = None

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
                                f"{first[0]}: {first[1]}); nothing written", self.src)

    def check_usable(self, rows: int, skipped: Sequence[tuple[str, str]]) -> None:
        if rows == 0:
            first = min(skipped)
            raise StreamnnError(f"no usable image ({len(skipped)} files skipped; first: "
                                f"{first[0]}: {first[1]}); nothing written", self.src)

    def writer(self, path: Path, items: Sequence[tuple[str, str, int]], **options: Any) -> StoreWriter:
        """A store writer at ``path`` with room for ``items`` in every split (``options`` added)."""
        writer = StoreWriter(path, **self.store_kwargs, options={**self.options, **options})
        try:
            sizes = collections.Counter(split for split, _, _ in items)
            for split in sorted(self.plan.files):
                writer.add_split(split, sizes[split])
        except BaseException:
            writer.abort()
            raise
        return writer

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
                    sink.add(split, next(decoded), label, rel)
                else:
                    skipped.append((rel, reason))
            done += len(reasons)
            self.done += len(reasons)
            self.check_skips(skipped)
            if progress is not None:
                progress(self.done, self.total)
        sink.flush()
        return sink.rows

    def decoder(self) -> _Decoder:
        return _Decoder(self.workers, decode_kwargs(self.options), self.mp_context)

    def result(self, skipped: list[tuple[str, str]], fingerprint: str, size_bytes: int) -> PackResult:
        counts: dict[str, dict[str, int]] = {s: {c: 0 for c in self.plan.class_names} for s in sorted(self.plan.files)}
        failed = {p for p, _ in skipped}
        for split, rel, label in self.items:
            if rel not in failed:
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
                 mp_context: str | None = None, plan: SourcePlan | None = None) -> PackJob:
    """Check the arguments and the output, scan ``src`` (unless its ``plan`` is given: MPI
    ranks other than 0 get it from rank 0) and draw the row order: a :class:`PackJob`."""
    t0, wall0 = time.perf_counter(), time.time()
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # as multiprocessing checks it
        raise StreamnnError("pack() called while a worker process starts, from a script re-run without "
                            "the `if __name__ == '__main__':` guard")
    hw = parse_size(size)
    _check_arguments(dtype, compression, per_class, max_skip_fraction, max_pixels)
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise StreamnnError(f"workers must be at least 1, not {workers}")
    out = Path(out)
    stale: list[Path] = []
    if plan is None:
        _check_output(out, force)
        plan = scan_source(src, classes=classes, per_class=per_class)
        for warning in plan.warnings:
            log.warning(warning)
        stale = remove_stale_temps(out, older_than=wall0)

    rng = make_rng(seed)
    items: list[tuple[str, str, int]] = []  # (split, relative path, label) in row order
    for split in sorted(plan.files):
        files = plan.files[split]
        items += [(split, *files[i]) for i in rng.permutation(len(files))]
    options = {**decode_options(hw, grayscale=grayscale, max_pixels=int(max_pixels),
                                exif_orientation=exif_orientation, reduced=reduced_decoding),
               "source_root": os.fspath(plan.root.resolve()), "layout": plan.layout,
               "split_folders": plan.split_folders, "classes": list(classes) if classes else None,
               "per_class": per_class, "file_order": "natural sort", "dtype": dtype, "compression": compression,
               "seed": seed, "max_skip_fraction": max_skip_fraction, "stats_split": plan.stats_split,
               "stats": "mean and population std (ddof=0) of uint8/255 from exact integer sums",
               "ignored_hidden": plan.ignored_hidden, "warnings": plan.warnings}
    if command is None:
        command = f"streamnn.pack.pack({os.fspath(src)!r}, {os.fspath(out)!r}, size={hw}, dtype={dtype!r}, seed={seed})"
    image_shape = (hw[0], hw[1], 1 if grayscale else 3)
    # Chunks do not depend on `workers`.
    chunk = max(1, min(MAX_CHUNK_IMAGES, MAX_CHUNK_BYTES // int(np.prod(image_shape))))
    job = PackJob(src=Path(src), out=out, plan=plan, items=items, options=options, image_shape=image_shape,
                  chunk=chunk, workers=min(workers, max(1, math.ceil(len(items) / chunk))),
                  store_kwargs={"class_names": plan.class_names, "image_shape": image_shape, "dtype": dtype,
                                "compression": compression, "channel_order": "GRAY" if grayscale else "BGR",
                                "command": command},
                  max_skip_fraction=max_skip_fraction, t0=t0, stale=stale, done=len(plan.skipped),
                  mp_context=mp_context)
    job.check_skips(plan.skipped)
    return job


def pack(src: str | os.PathLike, out: str | os.PathLike, *, progress: Callable[[int, int], None] | None = None,
         **kwargs: Any) -> PackResult:
    """Pack the image tree ``src`` into the store ``out``; see the module docstring for the rules.

    Keyword arguments are those of :func:`prepare_pack`: ``size`` (a side, ``"HxW"`` or
    ``(H, W)``), ``per_class``, ``classes``, ``dtype``, ``compression``, ``seed``, ``workers``,
    ``force``, ``max_pixels``, ``max_skip_fraction``, ``grayscale``, ``exif_orientation``,
    ``reduced_decoding``, ``command``, ``mp_context``. ``progress(done, total)`` is called as
    files are processed. Raises :class:`StreamnnError` (nothing written, a previous ``out``
    untouched) on bad arguments or layout, an existing ``out`` without ``force``, too many
    skipped files, or no usable image.
    """
    job = prepare_pack(src, out, **kwargs)
    skipped = list(job.plan.skipped)
    moments = RunningMoments(job.n_features)
    with job.decoder() as decoder, job.writer(job.out, job.items) as writer:
        rows = job.decode_into(writer, job.items, decoder, moments, skipped, progress)
        job.check_usable(rows, skipped)
        if moments.n:
            writer.set_stats(moments.mean, moments.std)
        skipped.sort()
        writer.set_skipped(skipped)
        fingerprint = writer.commit()
    return job.result(skipped, fingerprint, job.out.stat().st_size)


def _check_arguments(dtype: str, compression: str | None, per_class: int | None, max_skip_fraction: float,
                     max_pixels: int) -> None:
    if dtype not in DTYPES:
        raise StreamnnError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if compression not in COMPRESSIONS:
        raise StreamnnError(f"unknown compression {compression!r} (choose lzf or gzip)")
    if per_class is not None and per_class < 1:
        raise StreamnnError(f"per_class must be at least 1, not {per_class}")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise StreamnnError(f"max_skip_fraction must be between 0 and 1, not {max_skip_fraction}")
    if max_pixels < 1:
        raise StreamnnError(f"max_pixels must be positive, not {max_pixels}")
