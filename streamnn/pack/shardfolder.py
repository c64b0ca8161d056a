"""The shard folder of a sharded store (:class:`ShardFolder`): what a pack may write there, replace
or remove.

The folder belongs to one index: it is named from the index's whole file name (``OUT.h5`` ->
``OUT.h5.shards``, :func:`~streamnn.data.format.shard_folder`), so ``a.h5``, ``a.hdf5`` and ``a``
never share one. A file there is replaced (by a shard written under its name) or removed (a
shard of another K, once the new index is in place) only when it is provably a shard of this
store: a regular file (not a link) named ``part-<r>-of-<K>.h5`` and either

* recorded by the existing index OUT (the store that a ``--force`` pack replaces) and unchanged
  since (the size, fingerprint and metadata digest the index recorded); or
* a streamnn store whose options name it shard r of K written for this very index
  (``options.index``, OUT's resolved path): the shards of a run killed or failed before it
  wrote the index.

Anything else under the name of a shard to write (a file of the user's, a link, a folder,
another store or another store's shard, a file locked by a concurrent run) makes the pack
refuse before any decoding, ``--force`` included, with one line naming it; every other file in
the folder is left alone. After the new index is written, the shards the replaced index
recorded and that are still provably its (in this folder or in the folder release 0.1.0 named
``OUT.shards``) are removed, and so are shards of killed runs for this index.
"""
from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py

from streamnn.atomic import TMP_PREFIX
from streamnn.data.format import FOLDER_SUFFIX, FORMAT, PART_PATTERN, as_text, shard_folder, shard_record, shard_records
from streamnn.errors import StreamnnError
from streamnn.pack.output import remove_stale_temps, store_options, within
from streamnn.paths import path_text

#: The shard's option naming the index it was written for.
INDEX_OPTION = "index"


def index_identity(out: Path) -> str:
    """The resolved path of the index ``out`` (its folder resolved, its name as given)."""
    folder = out.parent if str(out.parent) else Path(".")
    return os.path.join(os.path.realpath(folder), out.name)


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _recorded(out: Path) -> dict[str, dict[str, Any]]:
    """The shard records of the existing index ``out`` ({relative file: record}); none if ``out``
    is not a readable sharded index."""
    if not _is_regular(out):
        return {}
    try:
        if not h5py.is_hdf5(out):
            return {}
        with h5py.File(out, "r") as f:
            if as_text(f.attrs.get("format")) != FORMAT or "shards" not in f.attrs:
                return {}
            records = shard_records(f.attrs["shards"], out)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeError, StreamnnError):
        return {}
    return {str(r["file"]): r for r in records}


def _own_folders(out: Path) -> tuple[str, str]:
    """The names the shard folder of the index ``out`` has had: ``OUT.h5.shards`` and, written by
    release 0.1.0, ``OUT.shards``."""
    return shard_folder(out).name, out.stem + FOLDER_SUFFIX


class ShardFolder:
    """The shard folder of the index ``out`` (packing from ``src``); see the module docstring."""

    def __init__(self, out: Path, src: Path) -> None:
        self.out = out
        self.folder = shard_folder(out)
        self.identity = index_identity(out)
        self.src = src
        # The records of the index this pack replaces, of the shards in its own folders only
        # (nothing else is ever replaced or removed on the word of an index: a copied index
        # records the shards of the store it was copied from).
        own = _own_folders(out)
        self.previous = {file: r for file, r in _recorded(out).items()
                         if len(file.split("/")) == 2 and file.split("/")[0] in own
                         and PART_PATTERN.fullmatch(file.split("/")[1])}

    def options(self, rank: int, size: int) -> dict[str, Any]:
        """The options that mark shard ``rank`` of ``size`` as written for this index."""
        return {"shard": [rank, size], INDEX_OPTION: self.identity}

    def owned(self, path: Path) -> bool:
        """Whether ``path`` is provably a shard of this store (see the module docstring)."""
        found = PART_PATTERN.fullmatch(path.name)
        if found is None or not _is_regular(path):
            return False
        record = self.previous.get(f"{path.parent.name}/{path.name}")
        if record is not None:
            with contextlib.suppress(OSError, RuntimeError, KeyError, ValueError, TypeError):
                if shard_record(path, str(record["file"])) == record:
                    return True
        options = store_options(path)
        return (options is not None and options.get(INDEX_OPTION) == self.identity
                and options.get("shard") == [int(found.group(1)), int(found.group(2))])

    def check_folder(self) -> None:
        """Refuse a shard folder that is a link or not a folder, or that overlaps SRC."""
        where = path_text(self.folder)
        try:
            mode: int | None = os.lstat(self.folder).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as exc:
            raise StreamnnError(f"cannot check the shard folder ({exc.strerror})", where) from None
        if mode is not None and stat.S_ISLNK(mode):
            raise StreamnnError("is a symbolic link; the shards go in a folder of that name beside OUT", where)
        if mode is not None and not stat.S_ISDIR(mode):
            raise StreamnnError("exists and is not a folder; the shards of a sharded store go there", where)
        real, real_src = os.path.realpath(self.folder), os.path.realpath(self.src)
        if within(real, real_src) or within(real_src, real):
            raise StreamnnError(f"the shard folder and SRC {path_text(self.src)} overlap; write the store elsewhere",
                                where)

    def claim(self, names: Iterable[str]) -> None:
        """Refuse (one line naming it) a file under one of the shard ``names`` that is not provably
        a shard of this store; called before decoding and again just before the shards are renamed
        into place."""
        for name in names:
            path = self.folder / name
            if os.path.lexists(path) and not self.owned(path):
                raise StreamnnError("is in the way of a shard to write and is not a shard of this store; "
                                    "refusing to replace it, also with --force (move or delete it yourself)",
                                    path_text(path))

    def prepare(self, names: Iterable[str], older_than: float) -> list[Path]:
        """Before decoding: check the folder and the shard ``names``, create the folder, remove
        the temporary shards of killed runs in it. Returns those removed."""
        self.check_folder()
        names = list(names)
        if os.path.isdir(self.folder):
            self.claim(names)
        self.folder.mkdir(exist_ok=True)
        removed = []
        for tmp in self.folder.glob(TMP_PREFIX + "part-*-of-*.h5.*"):
            name = tmp.name[len(TMP_PREFIX):].rsplit(".", 1)[0]
            if PART_PATTERN.fullmatch(name):
                removed += remove_stale_temps(self.folder / name, older_than)
        return removed

    def tidy(self, keep: Iterable[str] = ()) -> list[Path]:
        """After the new index is written: remove the shards that are provably this store's but
        not among ``keep`` (file names in this folder): those the replaced index recorded, and
        those of killed runs for this index. Returns those removed."""
        keep_paths = {os.path.abspath(self.folder / name) for name in keep}
        candidates = [self.out.parent / file for file in self.previous]
        with contextlib.suppress(OSError):
            candidates += [p for p in self.folder.iterdir() if PART_PATTERN.fullmatch(p.name)]
        removed = []
        for path in dict.fromkeys(candidates):
            if os.path.abspath(path) in keep_paths or os.path.islink(path.parent) or not self.owned(path):
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
        return removed
