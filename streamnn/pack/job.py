"""Pack an image folder tree into a streamnn store (the format: docs/format.md).

:func:`prepare_pack` checks the arguments and the output (:mod:`.output`) and scans SRC
(:mod:`.scan`); :func:`pack` then draws each split's row order from ``make_rng(seed)``,
decodes in the pool (:mod:`.pool`) and writes the rows in that order with their statistics
(:class:`RunningMoments`: exact integer sums, so the store depends neither on ``workers`` nor
on chunks or shards). If more than ``max_skip_fraction`` of the files are skipped, or none
decodes, nothing is written; on any error or Ctrl-C the workers are reaped, the temporary file
removed and a previous store stays as it was. See docs/packing.md for the design.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamnn.data.writer import StoreWriter, check_storage
from streamnn.errors import StreamnnError
from streamnn.pack.decode import (DEFAULT_MAX_FILE_SIZE, DEFAULT_MAX_PIXELS, decode_kwargs, decode_options, parse_size,
                                  signals_deferred)
from streamnn.pack.output import check_output, remove_stale_temps, writing
from streamnn.pack.pool import Decoder, default_workers
from streamnn.pack.scan import SourcePlan, scan_source
from streamnn.pack.worker import pixel_sums
from streamnn.paths import path_text
from streamnn.rng import make_rng

log = logging.getLogger(__name__)

MAX_BATCH_ROWS = 256          # rows per write_rows call ...
MAX_BATCH_BYTES = 8 << 20     # ... and at most this many float32 bytes per batch
MAX_CHUNK_IMAGES = 32         # images per pool task (<= 257: their pixel sums travel as uint32) ...
MAX_CHUNK_BYTES = 2 << 20     # ... and at most this many uint8 bytes per task result


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
    one_class: str | None = None        # the error of a tree with one class (after "no usable image")

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
        if self.one_class:
            raise StreamnnError(self.one_class)

    def start(self, stack: contextlib.ExitStack, outputs: Sequence[tuple[Path, Sequence[tuple[str, str, int]],
                                                                         dict[str, Any]]]
              ) -> tuple[Decoder, list[StoreWriter]]:
        """The decoder and a store writer per output (path, its items, options added), each
        with room for its items in every split, registered on ``stack`` with signals
        deferred (one writer at a time), so that a Ctrl-C finds the workers and the temporary
        files registered (a writer discards its files on any failure)."""
        with signals_deferred():
            decoder = stack.enter_context(Decoder(self.workers, decode_kwargs(self.options)))
        writers = []
        for path, _, extra in outputs:  # one at a time: a signal is acted on between two (many shards)
            with signals_deferred():
                writers.append(stack.enter_context(StoreWriter(path, **self.store_kwargs,
                                                               options={**self.options, **extra})))
        for writer, (path, items, _) in zip(writers, outputs):
            sizes = collections.Counter(split for split, _, _ in items)
            for split in sorted(self.plan.files):
                writer.add_split(split, sizes[split])
        return decoder, writers

    def decode_into(self, writer: StoreWriter, items: Sequence[tuple[str, str, int]], decoder: Decoder,
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
    one_class = None
    if plan is None:
        plan = scan_source(src, classes=classes, per_class=per_class)
        one_class = _check_classes(plan, classes, src)
        check_output(out, Path(src), force)
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
        command = f"streamnn.pack.pack({path_text(src)!r}, {path_text(out)!r}, size={hw}, dtype={dtype!r}, seed={seed})"
    image_shape = (hw[0], hw[1], 1 if grayscale else 3)
    chunk = max(1, min(MAX_CHUNK_IMAGES, MAX_CHUNK_BYTES // int(np.prod(image_shape))))
    job = PackJob(src=Path(src), out=out, plan=plan, items=items, options=options, image_shape=image_shape,
                  chunk=chunk, workers=min(workers, max(1, math.ceil(len(items) / chunk))),
                  store_kwargs={"class_names": plan.class_names, "image_shape": image_shape, "dtype": dtype,
                                "compression": compression, "channel_order": "GRAY" if grayscale else "BGR",
                                "command": command},
                  max_skip_fraction=max_skip_fraction, t0=t0, stale=stale, done=len(plan.skipped),
                  one_class=one_class)
    job.check_skips(plan.skipped)
    return job


def pack(src: str | os.PathLike, out: str | os.PathLike, *, progress: Callable[[int, int], None] | None = None,
         **kwargs: Any) -> PackResult:
    """Pack the image tree ``src`` into the store ``out``; see :mod:`streamnn.pack.scan` for the layout rules.

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
    with writing(job.out), contextlib.ExitStack() as stack:
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


def _check_classes(plan: SourcePlan, classes: Sequence[str] | None, src: str | os.PathLike) -> str | None:
    """One class cannot be trained on: an error (returned, raised by :meth:`PackJob.check_usable`
    before anything is written), unless ``classes`` names that one class on purpose (then a
    warning)."""
    if len(plan.class_names) != 1:
        return None
    name = plan.class_names[0]
    if classes is None:
        return str(StreamnnError(f"only one class folder ({name!r}): a classifier needs at least two classes "
                                 f"(give --classes {name} to pack it anyway); nothing written", path_text(src)))
    plan.warnings.append(f"one class only ({name!r}): the store cannot be trained on until it has a second class")
    return None


def _check_arguments(dtype: str, compression: str | None, per_class: int | None, max_skip_fraction: float,
                     max_pixels: int, max_file_size: int) -> None:
    check_storage(dtype, compression)
    if per_class is not None and per_class < 1:
        raise StreamnnError(f"per_class must be at least 1, not {per_class}")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise StreamnnError(f"max_skip_fraction must be between 0 and 1, not {max_skip_fraction}")
    if max_pixels < 1:
        raise StreamnnError(f"max_pixels must be positive, not {max_pixels}")
    if max_file_size < 1:
        raise StreamnnError(f"max_file_size must be positive, not {max_file_size}")
