"""Atomic, durable file output: write a temporary file beside the target, fsync, rename.

A crash or Ctrl-C at any moment leaves either the previous file or the complete new one,
and never a half-written target. Temporary names start with ``.streamnn-tmp-`` so that
stale ones from a killed run are recognisable and never mistaken for outputs.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".streamnn-tmp-"


def _default_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give (mkstemp would give 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_mode()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's) data to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it into place.

    On any exception (KeyboardInterrupt included) the temporary file is removed and the
    target is left as it was.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + ".", suffix=suffix, dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _FILE_MODE)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        with contextlib.suppress(OSError):
            fsync_path(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
