"""The output of a pack: what OUT may be (:func:`check_output`), write errors as one line
(:func:`writing`), and the temporary files of killed runs (:func:`remove_stale_temps`); a write
that fails is cleaned up by the writer itself (:class:`streamnn.data.writer.StoreWriter`).

OUT is refused, before anything is written, when it lies inside SRC (both resolved), is a
folder, symbolic link, device, FIFO or socket, or exists without ``force``; ``force`` replaces
only a streamnn store, recognised by content (:func:`is_store_file`), that is not the shard of
a sharded store.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py

from streamnn.atomic import temporary_prefix, write_error
from streamnn.data.format import FORMAT, as_text
from streamnn.errors import StreamnnError
from streamnn.paths import path_text

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temporary files are then only judged by age
    fcntl = None  # type: ignore[assignment]


def within(path: str, folder: str) -> bool:
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


def store_options(path: str | os.PathLike) -> dict[str, Any] | None:
    """The packing options of the streamnn store ``path`` (a regular file, not followed through
    a symlink), or None if it is not one or they are unreadable."""
    if not is_store_file(path):
        return None
    try:
        with h5py.File(path, "r") as f:
            options = json.loads(as_text(f.attrs["options"]))
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeError):
        return None
    return options if isinstance(options, dict) else None


def check_output(out: Path, src: Path, force: bool) -> None:
    """Refuse, before anything is written, an output that would destroy what is not ours (see
    the module docstring)."""
    where = path_text(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise StreamnnError("output folder does not exist", path_text(folder))
    real_out = os.path.join(os.path.realpath(folder), out.name)
    if within(real_out, os.path.realpath(src)):
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
        if "shard" in (store_options(out) or {}):
            raise StreamnnError("is a shard of a sharded store; --force does not replace it (write the store "
                                "elsewhere)", where)


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
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
