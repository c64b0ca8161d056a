"""``streamnn-pack SRC -o OUT.h5``: image folders to a streamnn store (wraps :func:`streamnn.pack.pack`)."""
from __future__ import annotations

import functools
import logging
import os
import shlex
import signal
import sys
import time

import click

from streamnn.data.format import COMPRESSIONS, STORE_DTYPES
from streamnn.dist import world
from streamnn.pack.decode import DEFAULT_MAX_FILE_SIZE, DEFAULT_MAX_PIXELS
from streamnn.pack.job import pack
from streamnn.pack.output import is_store_file
from streamnn.paths import path_text
from streamnn.pack.sharded import pack_sharded, rank_workers
from streamnn.cli.common import CONTEXT_SETTINGS, Command, fail, sigterm_as_interrupt, user_errors

EPILOG = """\b
Layouts: SRC/training_set/<class>/*, SRC/test_set/<class>/* (Kaggle; the splits
become "train" and "test", other split folders keep their names; download
nesting such as SRC/dataset/training_set or training_set/training_set is
unwrapped), or SRC/<class>/* (one split, "train").
\b
Every non-hidden file is decoded to check it (extensions are not trusted);
files that fail are skipped and listed. Hidden files/folders (.*) and __MACOSX
are ignored. Images are squashed to the square (or HxW) without keeping the
aspect ratio, EXIF orientation is applied, alpha is dropped, and rows are
written in an order shuffled by --seed. A class with no files in some split
is a warning. Mean and std are of split "train" (else the first split by name).
\b
Links: file links are read as files. A folder link is followed once, unless it
leads back into SRC, to a folder holding SRC (a loop such as up -> ..), or
into/above a folder already reached by another link; those are listed as
skipped. Names that are not UTF-8 are kept losslessly as text (\\xNN escapes).
\b
OUT is never a file that is not ours: it is refused when it lies inside SRC,
is a folder, a symbolic link, a device or FIFO, or exists without --force;
--force replaces only an existing streamnn store (recognised by content).
\b
Sharded stores: --shards N, or under MPI (mpiexec -n K streamnn-pack SRC -o
OUT.h5, with the streamnn[mpi] extra: rank r decodes its share of every split),
write OUT.h5.shards/part-<r>-of-<K>.h5 and the index OUT.h5, which opens as one
store (HDF5 virtual datasets; the same rows, order, statistics and fingerprint
as a one-file store). Move OUT.h5 and OUT.h5.shards together. The folder belongs
to that index: a file in it is replaced or removed only if it is provably one
of this store's shards; anything else under a shard's name is refused before
decoding, --force included. A tree with one class is refused unless --classes
names it.
\b
Exit status: 0 when the store is written (even with skipped files), 1 on an
error, 130 on Ctrl-C (SIGINT), 143 on SIGTERM; OUT is then not written (a
previous OUT stays as it was; only a signal after the final rename finds the
new store complete, and says so) and no worker process is left running.
"""


def _command_line(ctx: click.Context) -> str:
    """The command with every option spelled out (defaults included), to redo the packing."""
    args = ["streamnn-pack", path_text(ctx.params["src"]), "-o", path_text(ctx.params["out"])]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or param.name in ("out", "quiet") or value is None:
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            args += [flag] if value else []
        else:
            args += [flag, path_text(str(value))]
    return shlex.join(args)


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns


def _byte_size(text: str) -> int:
    """``536870912``, ``512M``, ``2G`` (powers of 1024) to a number of bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    body, unit = text.strip().upper().rstrip("IB"), ""
    if body and body[-1] in units:
        body, unit = body[:-1], body[-1]
    try:
        value = int(float(body) * units[unit])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size such as 512M or 2G") from None
    if value < 1:
        raise click.BadParameter(f"{text!r} must be positive")
    return value


@click.command(cls=Command, context_settings=CONTEXT_SETTINGS, epilog=EPILOG)
@click.argument("src", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str),
              help="Store file to write (HDF5, e.g. data.h5); written atomically.")
@click.option("--size", default="64", show_default=True,
              help="Image size: side of the square (64) or HxW (48x64). Images are squashed, not cropped.")
@click.option("--per-class", type=click.IntRange(min=1), default=None,
              help="Keep only the first N files of each class in each split (natural sort order: "
                   "cat.2 before cat.10). Default: all.")
@click.option("--classes", default=None,
              help="Comma-separated class names, in label order (label i = i-th name); other class "
                   "folders are left out. Default: all class folders, sorted by name.")
@click.option("--dtype", type=click.Choice(list(STORE_DTYPES)), default="float32", show_default=True,
              help="Stored type: float32/float16 hold pixel/255 in [0, 1]; uint8 holds raw pixels (4x smaller).")
@click.option("--compression", type=click.Choice([c or "none" for c in COMPRESSIONS]), default="none",
              show_default=True,
              help="HDF5 compression of X. none keeps X contiguous (fastest random reads).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the row order (each split is shuffled; same seed, same store).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Decoding processes (default: the cores this process may use); 1 decodes in-process. "
                   "The output does not depend on it.")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="Write a sharded store: N shard files in OUT.shards/ (OUT's whole name + .shards) and "
                   "the index OUT (under mpiexec: one shard per rank, the default). At most one shard per "
                   "image file: a larger N is an error.")
@click.option("--force", is_flag=True, help="Replace OUT if it is an earlier streamnn store (otherwise refuse).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Skip images whose header claims more pixels than this (decompression bombs).")
@click.option("--max-file-size", default=f"{DEFAULT_MAX_FILE_SIZE >> 20}M", show_default=True,
              help="Skip files larger than this, unread (bytes, or with K, M, G).")
@click.option("--max-skip-fraction", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True,
              help="Fail (write nothing) if more than this fraction of the files cannot be packed.")
@click.option("--grayscale", is_flag=True, help="Store one gray channel instead of BGR.")
@click.option("--ignore-exif-orientation", is_flag=True,
              help="Keep the pixels as stored instead of rotating them by the EXIF orientation tag.")
@click.option("--full-decode", is_flag=True,
              help="Decode JPEGs at full resolution before resizing (slower; by default they are "
                   "decoded at 1/2, 1/4 or 1/8 scale when still at least the target size).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
def main(src: str, out: str, size: str, per_class: int | None, classes: str | None, dtype: str,
         compression: str, seed: int, workers: int | None, shards: int | None, force: bool, max_pixels: int,
         max_file_size: str, max_skip_fraction: float, grayscale: bool, ignore_exif_orientation: bool, full_decode: bool,
         quiet: bool) -> None:
    """Pack the image folders under SRC into one HDF5 store OUT of flattened images.

    Each split holds X (N, H*W*C; HxWxC BGR pixels per row), labels y and source paths,
    plus the training split's per-feature mean and std. Run streamnn-info OUT to inspect it.
    """
    logging.basicConfig(format="Warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    file_limit = _byte_size(max_file_size)
    command = _command_line(click.get_current_context())
    with user_errors(ranks=True):
        comm = world()  # under mpiexec -n K: K ranks, rank r writes shard r (streamnn.pack.sharded)
    if comm.size > 1:
        command = f"mpiexec -n {comm.size} {command}"
        quiet = quiet or comm.rank != 0
    bar = None
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        nonlocal bar
        stop.check()
        if quiet or not sys.stderr.isatty():  # a bar only for a person watching
            return
        if bar is None:
            bar = click.progressbar(length=total, label="Packing", show_pos=True, file=sys.stderr,
                                    item_show_func=lambda s: s)
            bar.__enter__()
        rate = done / max(time.perf_counter() - start, 1e-9)
        bar.update(done - bar.pos, f"{rate:.0f} images/s")

    if classes is not None and not classes.strip():
        fail("--classes is empty; give comma-separated class names")
    before = _identity(out)

    def interrupted() -> str:  # after the rename into place, the store cannot be unwritten
        if _identity(out) != before and is_store_file(out):
            return f"interrupted after the store was written ({path_text(out)} is the new, complete store)"
        return f"interrupted; nothing written ({path_text(out)} left as it was)"

    run = pack if comm.size == 1 and shards is None else functools.partial(pack_sharded, shards=shards, comm=comm)
    with sigterm_as_interrupt() as stop:
        try:
            with user_errors(interrupted, ranks=True):
                if comm.size > 1 and workers is None:
                    workers = rank_workers(comm)
                result = run(src, out, size=size, per_class=per_class,
                             classes=classes.split(",") if classes is not None else None, dtype=dtype,
                             compression=None if compression == "none" else compression, seed=seed,
                             workers=workers, force=force, max_pixels=max_pixels, max_file_size=file_limit,
                             max_skip_fraction=max_skip_fraction, grayscale=grayscale,
                             exif_orientation=not ignore_exif_orientation, reduced_decoding=not full_decode,
                             command=command, progress=progress)
                stop.check()  # a stop swallowed after the last progress call
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the store is written: a signal from now on could
        signal.signal(sig, signal.SIG_IGN)      # only kill the exit itself (Python's own handlers are
    if not quiet:                               # gone during interpreter shutdown), so it is ignored
        with user_errors(f"interrupted (the store {path_text(out)} is written)"):
            click.echo(result.summary())


if __name__ == "__main__":
    main()
