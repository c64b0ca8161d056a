"""Writing HDF5 files that may fail (a full disk, a file-size limit, an I/O error), for every writer.

HDF5 writes lazily: its caches are flushed when a dataset or the file is closed, and a flush that
fails leaves the file half-closed, retried by h5py's finalizers ("Exception ignored in
ObjectID.__dealloc__") and, at exit, by the library (a segmentation fault). So a writer holds
every HDF5 object it writes to (no temporary handle is dropped during an error), flushes with the
space checked first (:func:`flush_close`), and on any failure closes the file inside the error
path with :func:`close_hard`: HDF5's descriptor is first pointed at ``/dev/null`` (the pending
flushes then succeed and write nothing), then the file is closed (a close that still fails is
retried once; the second attempt releases it). :func:`h5_output` does all of it for a file
written in one block (a checkpoint); :class:`streamnn.data.writer.StoreWriter` for a store.
"""
from __future__ import annotations

import contextlib
import errno as _errno
import os
import re
from collections.abc import Iterator
from typing import Any

import h5py

from streamnn.errors import StreamnnError
from streamnn.paths import path_text

_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")


def failure_text(exc: BaseException) -> str:
    """What went wrong in an HDF5 write: the errno's meaning (h5py puts ``errno = N`` in its
    RuntimeError messages), else the exception's class and first words."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else None
    if code is None:
        found = _ERRNO_IN_MESSAGE.search(str(exc))
        code = int(found.group(1)) if found else None
    if code is not None and code in _errno.errorcode:
        return os.strerror(code)
    return f"cannot write ({exc.__class__.__name__}: {' '.join(str(exc).split())[:160]})"


def close_hard(f: h5py.File) -> None:
    """Close an HDF5 file being written after a failed write, so that nothing is left to a
    finalizer: its pending flushes go to /dev/null, then the file and every object in it are
    closed (errors ignored: the caller reports the first failure and removes the file)."""
    with contextlib.suppress(Exception):
        if not f.id.valid:
            return
        if f.driver == "sec2":
            fd, sink = f.id.get_vfd_handle(), os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(sink, fd)
            finally:
                os.close(sink)
    try:
        f.close()
        return
    except Exception:
        pass
    with contextlib.suppress(Exception):  # a close stopped by truncating /dev/null: the second one ends it
        f.close()


def checked_flush(f: h5py.File) -> None:
    """Flush ``f``, having first checked that the disk and the file-size limit allow
    everything HDF5 has allocated in it (its end of allocation): a full disk or a file-size limit
    then fails here, before HDF5 writes anything, not in the middle of its cache flush (after a
    metadata flush that failed, HDF5 can no longer close the file: "slist already enabled").
    The space is reserved (holes filled) up to the file's present size; beyond it, the file is
    cut back to that size (HDF5 sets the final size at close), so the check there is a probe:
    another process that fills the disk in between is the residual race."""
    if f.driver == "sec2":
        fd, size = f.id.get_vfd_handle(), int(f.id.get_filesize())
        before = os.fstat(fd).st_size
        try:
            if not hasattr(os, "posix_fallocate"):
                raise OSError(_errno.ENOSYS, "no posix_fallocate")
            os.posix_fallocate(fd, 0, max(size, 1))
        except OSError as exc:
            if exc.errno not in (_errno.EINVAL, _errno.EOPNOTSUPP, _errno.ENOSYS):
                raise
            os.ftruncate(fd, max(size, before))  # no fallocate here: at least the file-size limit
        if os.fstat(fd).st_size != before:
            os.ftruncate(fd, before)
    f.flush()


def flush_close(f: h5py.File) -> None:
    """:func:`checked_flush`, then close (nothing is left for the close to write)."""
    checked_flush(f)
    f.close()


@contextlib.contextmanager
def h5_output(path: str | os.PathLike, target: str | os.PathLike) -> Iterator[tuple[h5py.File, list[Any]]]:
    """A new HDF5 file at ``path`` and a list to hold the objects written into it, flushed (space
    checked) and closed at the end; a failure closes it hard and is one StreamnnError naming
    ``target`` (the caller removes ``path``, e.g. :func:`streamnn.atomic.atomic_output`)."""
    f = h5py.File(path, "w")
    held: list[Any] = []
    try:
        yield f, held
        flush_close(f)
    except BaseException as exc:
        close_hard(f)
        held.clear()
        if isinstance(exc, (OSError, RuntimeError)):  # what h5py raises for a failed write
            raise StreamnnError(failure_text(exc), path_text(target)) from None
        raise
