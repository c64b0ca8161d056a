"""The run folder: the only code that knows which files a training run owns, and the one safe way
to open them.

A run folder (``streamnn-train --out DIR``) holds these run files, each recognised by what it
*contains*, never by its name alone:

==========================  ==========================================================
``checkpoint-latest.h5``,   a regular HDF5 file whose root attribute ``format`` is
``checkpoint-best.h5``      ``"streamnn-checkpoint"``
``config.json``             a JSON object with ``"format": "streamnn-run-config"`` (or, as
                            written before that marker, ``streamnn_version`` and every
                            configuration key)
``metrics.csv``             first line: the metrics header (:data:`METRICS_HEADER`)
``steps.csv``               first line: ``step,epoch,loss``
``curves.png``              a PNG holding the text chunk ``Software = streamnn run curves``
                            (or, as drawn before that marker, matplotlib's ``Software``
                            chunk, in a folder whose ``checkpoint-latest.h5`` is ours)
``.streamnn-train.lock``    a regular file, empty or holding one pid line
``.streamnn-tmp-<run file>.*``  a regular file: a temporary of a write that was interrupted
                            (its content is partial, so here the name and the file type decide)
==========================  ==========================================================

Everything else in the folder (a file of another kind, the same name with other content,
a symlink, a folder, a FIFO...) is *foreign*. The rules built on that:

* a foreign entry at a run file's name is never replaced or deleted: starting, forcing or
  resuming a run there is refused, with a one-line error naming it;
* a new run (no ``--force``) refuses a folder holding any foreign entry, and a folder that
  already holds a run (a checkpoint);
* ``--force`` deletes the run files and nothing else; foreign entries at other names stay.

Opening. Run files are created by :mod:`streamnn.atomic` (``O_EXCL | O_NOFOLLOW`` temporary,
rename), read and appended to with ``O_NOFOLLOW`` and only when they are regular files. The
lock is opened with ``O_NOFOLLOW | O_NONBLOCK`` and refused unless it is a regular file whose
content is a lock's, so a symlink planted there never truncates its target, and a FIFO never
blocks. The lock is POSIX ``flock`` and dies with its process.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from streamnn.atomic import TMP_PREFIX, atomic_write
from streamnn.errors import StreamnnError
from streamnn.paths import path_text

LATEST, BEST = "checkpoint-latest.h5", "checkpoint-best.h5"
METRICS_CSV, STEPS_CSV, CURVES_PNG, CONFIG_JSON = "metrics.csv", "steps.csv", "curves.png", "config.json"
RUN_FILES = (LATEST, BEST, METRICS_CSV, STEPS_CSV, CURVES_PNG, CONFIG_JSON)
LOCK_FILE = ".streamnn-train.lock"  # holds the pid of the run using the folder
HISTORY_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                   "eval_loss", "eval_accuracy", "best")
METRICS_HEADER = ",".join(HISTORY_COLUMNS)
STEPS_HEADER = "step,epoch,loss"
CONFIG_FORMAT = "streamnn-run-config"
CURVES_METADATA = {"Software": "streamnn run curves"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_MAX_TEXT_PROBE = 1 << 20  # config.json larger than this is not ours
# config.json as written before the format marker: these keys among others
_LEGACY_CONFIG_KEYS = {"streamnn_version", "store", "train_split", "model", "hidden", "optimizer", "lr",
                       "epochs", "batch_size", "seed", "checkpoint_every"}


def _where(path: Path) -> str:
    return path_text(path)


def _regular(path: Path) -> os.stat_result | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _read_head(path: Path, n: int) -> bytes | None:
    """First ``n`` bytes of a regular file (never through a symlink), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, n)
    finally:
        os.close(fd)


def _first_line_is(path: Path, header: str) -> bool:
    head = _read_head(path, len(header) + 2)
    return head is not None and (head.startswith(header.encode() + b"\n")
                                 or head.startswith(header.encode() + b"\r\n") or head == header.encode())


def _is_checkpoint(path: Path) -> bool:
    if _regular(path) is None or _read_head(path, 8) != b"\x89HDF\r\n\x1a\n":
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("format")
    except Exception:  # noqa: BLE001 - anything unreadable is not recognisably ours
        return False
    return (value.decode() if isinstance(value, bytes) else value) == "streamnn-checkpoint"


def _is_config(path: Path) -> bool:
    st = _regular(path)
    if st is None or st.st_size > _MAX_TEXT_PROBE:
        return False
    try:
        data = json.loads(_read_head(path, _MAX_TEXT_PROBE) or b"")
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    return data.get("format") == CONFIG_FORMAT or _LEGACY_CONFIG_KEYS <= set(data)


def png_text_chunks(head: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG found in ``head`` before its image data."""
    out: dict[str, str] = {}
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(head):
        length, kind = struct.unpack(">I4s", head[pos:pos + 8])
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"tEXt":
            key, _, value = head[pos + 8:pos + 8 + length].partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    return out


def _curves_software(path: Path) -> str | None:
    """The ``Software`` text chunk of the PNG ``path`` (None if it is not a regular PNG file)."""
    head = _read_head(path, 1 << 16)
    if head is None or not head.startswith(_PNG_SIGNATURE):
        return None
    return png_text_chunks(head).get("Software", "")


def _is_curves(path: Path) -> bool:
    return _curves_software(path) == CURVES_METADATA["Software"]


def _is_lock(path: Path) -> bool:
    head = _read_head(path, 64)
    return head is not None and (head.strip() == b"" or head.strip().isdigit())


_RECOGNISE = {LATEST: _is_checkpoint, BEST: _is_checkpoint, CONFIG_JSON: _is_config, CURVES_PNG: _is_curves,
              METRICS_CSV: lambda p: _first_line_is(p, METRICS_HEADER),
              STEPS_CSV: lambda p: _first_line_is(p, STEPS_HEADER), LOCK_FILE: _is_lock}


def _is_temporary(name: str) -> bool:
    return any(name.startswith(f"{TMP_PREFIX}{run_file}.") for run_file in RUN_FILES)


def _kind(path: Path) -> str:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "unreadable"
    for test, what in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return what
    return "a file"


class RunDir:
    """One run folder ``path``; see the module docstring for what it owns."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- what is in the folder ---------------------------------------------------------------
    def is_ours(self, name: str) -> bool:
        """Whether entry ``name`` is a file of a streamnn run (by content, see the module docstring)."""
        path = self.path / name
        if name == CURVES_PNG and not _is_curves(path):  # drawn by a release before the marker?
            legacy = (_curves_software(path) or "").startswith("Matplotlib version")
            return legacy and _is_checkpoint(self.path / LATEST)
        if name in _RECOGNISE:
            return _RECOGNISE[name](path)
        return _is_temporary(name) and _regular(path) is not None

    def survey(self) -> tuple[list[str], list[str]]:
        """(our entries, foreign entries), each sorted; empty when the folder does not exist."""
        try:
            names = sorted(os.listdir(self.path))
        except FileNotFoundError:
            return [], []
        ours = [n for n in names if self.is_ours(n)]
        return ours, [n for n in names if n not in ours]

    def _describe(self, names: Sequence[str]) -> str:
        shown = ", ".join(f"{path_text(n)} ({_kind(self.path / n)})" for n in names[:3])
        return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    def check_run_names(self) -> None:
        """Refuse when something foreign sits at a run file's name (it would be replaced)."""
        _, foreign = self.survey()
        clashing = [n for n in foreign if n in RUN_FILES or n == LOCK_FILE]
        if clashing:
            raise StreamnnError(f"{self._describe(clashing)}: not the file of a streamnn run, and this run "
                                "would replace it: move it away or choose another --out", _where(self.path))

    def prepare_new(self, force: bool) -> None:
        """Before a new run (under :meth:`lock`): refuse foreign entries and an earlier run unless
        ``force``; with ``force`` delete the earlier run's files (and only those)."""
        self.check_run_names()
        ours, foreign = self.survey()
        if foreign and not force:
            raise StreamnnError(f"holds files that are not from a streamnn run: {self._describe(foreign)}; "
                                "choose an empty or new --out (or --force to write beside them)",
                                _where(self.path))
        if LATEST in ours and not force:
            raise StreamnnError(f"already holds a run ({LATEST}): add --resume to continue it, "
                                "--force to start over, or choose another --out", _where(self.path))
        if force:
            for name in ours:
                if name != LOCK_FILE:
                    (self.path / name).unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> list[str]:
        """Delete temporaries a killed run left behind (never a complete output); returns their names."""
        removed = []
        for name in self.survey()[0]:
            if _is_temporary(name):
                with contextlib.suppress(OSError):
                    (self.path / name).unlink()
                    removed.append(name)
        return removed

    # -- the lock ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder (created if needed): a second trainer in the same
        folder fails at once instead of interleaving checkpoints. Where ``fcntl`` does not exist,
        nothing is locked."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        path = self.path / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0), 0o644)
        except OSError:
            if os.path.islink(path) or os.path.isdir(path):
                raise StreamnnError(f"is {_kind(path)}, not a lock file: remove it", _where(path)) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StreamnnError(f"is {_kind(path)}, not a lock file: remove it", _where(path))
        with os.fdopen(fd, "r+", encoding="utf-8", errors="replace") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = f.read(64).strip()
                raise StreamnnError("another training run is using this folder"
                                    + (f" (pid {holder})" if holder.isdigit() else ""), _where(self.path)) from None
            if not _is_lock(path):
                raise StreamnnError("is not a streamnn lock file (it holds other data): move it away",
                                    _where(path))
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
            try:
                yield
            finally:
                f.truncate(0)

    # -- reading and writing run files ------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        """Replace run file ``name`` atomically (never through a symlink)."""
        atomic_write(self.path / name, text.encode("utf-8"))

    def read_bytes(self, name: str) -> bytes | None:
        """The content of run file ``name`` (None when absent); refuses anything but a regular file."""
        path = self.path / name
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            return None
        except OSError:
            if os.path.lexists(path):
                raise StreamnnError(f"is {_kind(path)}, not a run file: move it away", _where(path)) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StreamnnError(f"is {_kind(path)}, not a run file: move it away", _where(path))
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def open_append(self, name: str) -> IO[str]:
        """Run file ``name`` opened for appending text (never through a symlink; must be regular)."""
        path = self.path / name
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StreamnnError(f"is {_kind(path)}, not a run file: move it away", _where(path))
        return os.fdopen(fd, "a", encoding="utf-8")

    def steps_log(self, step: int) -> IO[str]:
        """``steps.csv`` cut back to ``step`` rows and opened for appending.

        Rows up to ``step`` are kept; rows after it (a resume redoes them) and a torn last line
        are dropped; any other unreadable row is an error naming the file and the line.
        """
        keep = [STEPS_HEADER + "\n"]
        raw = self.read_bytes(STEPS_CSV) if step else None
        if raw is not None:
            lines = raw.split(b"\n")
            if lines[0].rstrip(b"\r").decode("utf-8", "replace") != STEPS_HEADER:
                raise StreamnnError("is not a streamnn steps log (no 'step,epoch,loss' header): move it away",
                                    _where(self / STEPS_CSV))
            for number, line in enumerate(lines[1:-1], start=2):  # lines[-1]: empty, or a torn line
                row = _parse_step(line)
                if row is None:
                    raise StreamnnError(f"line {number} is damaged (not 'step,epoch,loss' numbers in UTF-8): "
                                        "fix or remove the file to resume", _where(self / STEPS_CSV))
                if row > step:
                    break
                keep.append(line.decode() + "\n")
        self.write_text(STEPS_CSV, "".join(keep))
        return self.open_append(STEPS_CSV)


def _parse_step(line: bytes) -> int | None:
    """The step number of a valid ``step,epoch,loss`` row, else None."""
    try:
        fields = line.decode("utf-8").split(",")
        if len(fields) != 3 or not fields[0].isdigit() or not fields[1].isdigit():
            return None
        float(fields[2])
    except (UnicodeDecodeError, ValueError):
        return None
    return int(fields[0])


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of run folder ``out`` (see :meth:`RunDir.lock`)."""
    with RunDir(out).lock():
        yield
