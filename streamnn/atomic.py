"""Atomic, durable file output: write a temporary file beside the target, fsync, rename.

A crash or Ctrl-C at any moment leaves either the previous file or the complete new one,
and never a half-written target. Temporary names start with ``.streamnn-tmp-`` so that
stale ones from a killed run are recognisable and never mistaken for outputs.

Symlinks. The temporary file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a name that
exists, a planted symlink included, is never opened). Before the rename the temporary name
must still be a regular file (a writer may itself have replaced it by a rename, as store
compaction does, but a symlink planted there is never fsynced, renamed or deleted: the
output fails instead). The rename replaces a symlink at the target itself, never the file
it points to. :func:`atomic_write`
writes bytes through the descriptor, so it never opens a name at all.

Long names. The temporary name is ``.streamnn-tmp-<target name>.<owner>-<8 random>``; for a
target name too long to fit in NAME_MAX with that, the target name is cut in the temporary name.

Stale temporaries. ``<owner>`` is ``h<6 hex of the host name>p<pid, 7 digits>``: a process killed
in the middle of a write (SIGKILL, power loss) leaves its temporary behind, and the next write
of the same target removes it, when it is a regular file written on this host by a process
that no longer runs. A temporary of a live process, of another host or without an owner is
never touched.

Errors. HDF5 reports a failed write (disk full, file too large) as a RuntimeError or an
OSError whose message holds ``errno = N``: :func:`write_error` turns it into the OSError
``<target>: <what errno N means>`` that the command-line boundary prints.
"""
from __future__ import annotations

import contextlib
import errno as _errno
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from streamnn.errors import StreamnnError

TMP_PREFIX = ".streamnn-tmp-"
_RANDOM_CHARS = 8   # what tempfile.mkstemp adds
_NAME_MAX = 255


def _default_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give (mkstemp would give 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_mode()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (never through a symlink) or a folder's data to disk."""
    is_dir = os.path.isdir(path)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else getattr(os, "O_NOFOLLOW", 0))
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_prefix(target_name: str, suffix: str = "") -> str:
    """``.streamnn-tmp-<name>.``, the name cut so that the whole temporary name fits NAME_MAX."""
    room = _NAME_MAX - len(TMP_PREFIX) - 1 - _RANDOM_CHARS - len(os.fsencode(suffix))
    return TMP_PREFIX + os.fsdecode(os.fsencode(target_name)[:max(room, 1)]) + "."


_OWNER_LEN = len("h000000p0000000-")


def _owner_tag() -> str:
    import hashlib
    import socket

    host = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]
    return f"h{host}p{os.getpid() % 10_000_000:07d}-"


def _owner_is_gone(tag: str) -> bool:
    """Whether the process that wrote a temporary tagged ``tag`` is known to have ended."""
    mine = _owner_tag()
    if len(tag) != _OWNER_LEN or tag[:8] != mine[:8] or not tag[8:15].isdigit():
        return False  # another host, or not an owner tag
    pid = int(tag[8:15])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive (another user's) or unknown
        return False
    return False


def remove_stale_temporaries(target: str | os.PathLike, suffix: str = "") -> list[Path]:
    """Remove the temporaries of earlier writes of ``target`` whose writer ended (see the module
    docstring); returns them."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    prefix = temporary_prefix(target.name, suffix + "x" * _OWNER_LEN)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix) or not name.endswith(suffix):
            continue
        rest = name[len(prefix):len(name) - len(suffix)]
        if len(rest) != _OWNER_LEN + _RANDOM_CHARS or not _owner_is_gone(rest[:_OWNER_LEN]):
            continue
        path = folder / name
        if _is_regular(path):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def _atomic(target: str | os.PathLike, suffix: str = "") -> Iterator[tuple[Path, int]]:
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    remove_stale_temporaries(target, suffix)
    tag = _owner_tag()
    fd, tmp_name = tempfile.mkstemp(prefix=temporary_prefix(target.name, suffix + tag) + tag, suffix=suffix,
                                    dir=folder)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, _FILE_MODE)
        yield tmp, fd
        if not _is_regular(tmp):
            raise StreamnnError("the temporary file was replaced by a symlink or removed while it was "
                                f"written; {target.name} was not replaced", tmp)
        fsync_path(tmp)
        os.replace(tmp, target)
        with contextlib.suppress(OSError):
            fsync_path(folder)
    except BaseException:
        if _is_regular(tmp):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it into place.

    On any exception (KeyboardInterrupt included) the temporary file is removed and the
    target is left as it was.
    """
    with _atomic(target, suffix) as (tmp, _fd):
        yield tmp


def atomic_write(target: str | os.PathLike, data: bytes) -> None:
    """Replace ``target`` by ``data`` atomically, writing through the temporary file's descriptor."""
    with _atomic(target) as (_tmp, fd):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")


def write_error(exc: BaseException, target: str | os.PathLike) -> OSError | StreamnnError:
    """An HDF5 write failure as ``OSError(errno, strerror, target)`` (or a StreamnnError naming target)."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else None
    if code is None:
        found = _ERRNO_IN_MESSAGE.search(str(exc))
        code = int(found.group(1)) if found else None
    if code is not None and code in _errno.errorcode:
        return OSError(code, os.strerror(code), os.fspath(target))
    return StreamnnError(f"cannot write ({exc.__class__.__name__}: {' '.join(str(exc).split())[:160]})", target)
