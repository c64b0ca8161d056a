"""``streamnn-pack SRC -o OUT.h5``: image folders to a streamnn store (wraps :func:`streamnn.pack.pack`)."""
from __future__ import annotations

import logging
import shlex
import signal
import sys
import time

import click

from ..decode import DEFAULT_MAX_PIXELS
from ..errors import StreamnnError
from ..pack import default_workers, pack

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
         compression: str, seed: int, workers: int | None, force: bool, max_pixels: int,
         max_skip_fraction: float, grayscale: bool, ignore_exif_orientation: bool, full_decode: bool,
         quiet: bool) -> None:
    """Pack the image folders under SRC into one HDF5 store OUT of flattened images.

    Each split holds X (N, H*W*C; HxWxC BGR pixels per row), labels y and source paths,
    plus the training split's per-feature mean and std. Run streamnn-info OUT to inspect it.
    """
    logging.basicConfig(format="Warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    previous_term = signal.signal(signal.SIGTERM, _term_to_interrupt)  # kill <pid>: clean up like Ctrl-C
    command = _command_line(click.get_current_context())
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
            result = pack(src, out, size=size, per_class=per_class,
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
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(f"Error: interrupted; nothing written ({out} left as it was)", err=True)
        sys.exit(130)
    if not quiet:
        click.echo(result.summary())


if __name__ == "__main__":
    main()
