"""``streamnn-pack SRC -o OUT.h5``: image folders to a streamnn store (wraps :func:`streamnn.pack.pack`)."""
from __future__ import annotations

import functools
import logging
import shlex
import signal
import sys
import time

import click

from ..decode import DEFAULT_MAX_PIXELS
from ..errors import StreamnnError
from ..pack import default_workers, pack
from ..shards import CollectiveError, mpi_world, pack_sharded, rank_workers

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
\b
Sharded stores: --shards N, or under MPI (mpiexec -n K streamnn-pack SRC -o
OUT.h5, with the streamnn[mpi] extra: rank r decodes its share of every split),
write OUT.shards/part-<r>-of-<K>.h5 and the index OUT.h5, which opens as one
store (HDF5 virtual datasets; the same rows, order, statistics and fingerprint
as a one-file store). Move OUT.h5 and OUT.shards together.
\b
Exit status: 0 when the store is written (even with skipped files), 1 on an
error, 130 on Ctrl-C or SIGTERM; OUT is then not written (a previous OUT stays).
"""


def _command_line(ctx: click.Context) -> str:
    """The command with every option spelled out (defaults included), to redo the packing."""
    args = ["streamnn-pack", ctx.params["src"], "-o", ctx.params["out"]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or param.name in ("out", "quiet") or value is None:
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            args += [flag] if value else []
        else:
            args += [flag, str(value)]
    return shlex.join(args)


def _fail(comm: object, message: str, status: int, collective: bool) -> None:
    """Report an error and exit; under MPI, an error only this rank met ends every rank
    (MPI_Abort, after this rank has cleaned up), and one that all ranks share (or Ctrl-C,
    which mpiexec sends to every rank) is printed once."""
    rank = comm.Get_rank() if comm is not None else 0  # type: ignore[attr-defined]
    if rank == 0 or not (collective or status == 130):
        click.echo(f"Error: {'' if rank == 0 else f'rank {rank}: '}{message}", err=True)
    if comm is not None and not collective:
        sys.stderr.flush()
        time.sleep(0.2)  # let mpiexec pass the line on before it ends the ranks
        comm.Abort(status)  # type: ignore[attr-defined]
    sys.exit(status)


def _term_to_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
               epilog=EPILOG)
@click.argument("src", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Store file to write (HDF5, e.g. data.h5); written atomically.")
@click.option("--size", default="64", show_default=True,
              help="Image size: side of the square (64) or HxW (48x64). Images are squashed, not cropped.")
@click.option("--per-class", type=click.IntRange(min=1), default=None,
              help="Keep only the first N files of each class in each split (natural sort order: "
                   "cat.2 before cat.10). Default: all.")
@click.option("--classes", default=None,
              help="Comma-separated class names, in label order (label i = i-th name); other class "
                   "folders are left out. Default: all class folders, sorted by name.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "uint8"]), default="float32", show_default=True,
              help="Stored type: float32/float16 hold pixel/255 in [0, 1]; uint8 holds raw pixels (4x smaller).")
@click.option("--compression", type=click.Choice(["none", "lzf", "gzip"]), default="none", show_default=True,
              help="HDF5 compression of X. none keeps X contiguous (fastest random reads).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the row order (each split is shuffled; same seed, same store).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help=f"Decoding processes (default: all cores, {default_workers()} here); 1 decodes in-process. "
                   "The output does not depend on it.")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="Write a sharded store: N shard files in OUT.shards/ and the index OUT (under "
                   "mpiexec: one shard per rank, the default).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists (otherwise refuse).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Skip images whose header claims more pixels than this (decompression bombs).")
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
         max_skip_fraction: float, grayscale: bool, ignore_exif_orientation: bool, full_decode: bool,
         quiet: bool) -> None:
    """Pack the image folders under SRC into one HDF5 store OUT of flattened images.

    Each split holds X (N, H*W*C; HxWxC BGR pixels per row), labels y and source paths,
    plus the training split's per-feature mean and std. Run streamnn-info OUT to inspect it.
    """
    logging.basicConfig(format="Warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    previous_term = signal.signal(signal.SIGTERM, _term_to_interrupt)  # kill <pid>: clean up like Ctrl-C
    command = _command_line(click.get_current_context())
    comm = mpi_world()
    rank = comm.Get_rank() if comm is not None else 0
    if comm is not None:
        command = f"mpiexec -n {comm.Get_size()} {command}"
        workers = rank_workers(comm) if workers is None else workers
        quiet = quiet or rank != 0
    bar = None
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if quiet or not sys.stderr.isatty():  # a bar only for a person watching
            return
        if bar is None:
            bar = click.progressbar(length=total, label="Packing", show_pos=True, file=sys.stderr,
                                    item_show_func=lambda s: s)
            bar.__enter__()
        rate = done / max(time.perf_counter() - start, 1e-9)
        bar.update(done - bar.pos, f"{rate:.0f} images/s")

    try:
        try:
            run = pack if comm is None and shards is None else functools.partial(pack_sharded, shards=shards,
                                                                                  comm=comm)
            result = run(src, out, size=size, per_class=per_class,
                          classes=classes.split(",") if classes else None, dtype=dtype,
                          compression=None if compression == "none" else compression, seed=seed,
                          workers=workers, force=force, max_pixels=max_pixels,
                          max_skip_fraction=max_skip_fraction, grayscale=grayscale,
                          exif_orientation=not ignore_exif_orientation, reduced_decoding=not full_decode,
                          command=command, progress=progress)
        finally:
            signal.signal(signal.SIGTERM, previous_term)
            if bar is not None:
                bar.__exit__(None, None, None)
    except StreamnnError as exc:
        _fail(comm, str(exc), 1, collective=isinstance(exc, CollectiveError))
    except KeyboardInterrupt:
        _fail(comm, f"interrupted; nothing written ({out} left as it was)", 130, collective=False)
    if not quiet:
        click.echo(result.summary())


if __name__ == "__main__":
    main()
