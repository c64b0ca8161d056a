"""The store format's constants, content fingerprint and sharded-store integrity checks.

A store is one HDF5 file (``format = "streamnn-store"``) of splits (``X`` (N, D), ``y``,
``paths``) plus ``stats`` and ``skipped``, X page-aligned in new stores (:data:`X_ALIGNMENT`,
:func:`x_layout`); a sharded store is an index of virtual datasets over shard files
(``OUT.h5.shards/``), checked on every open (:func:`check_index`). The format is written once,
in docs/format.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import h5py
import numpy as np

from streamnn.errors import StreamnnError
from streamnn.paths import path_text

FORMAT = "streamnn-store"
FORMAT_VERSION = 1
#: New stores are written with HDF5 file alignment (``H5Pset_alignment``): every object of at
#: least this many bytes, X of every split above all, starts at a multiple of it in the file (a
#: memory page), recorded as the root attribute ``x_alignment``. Rows whose size is a multiple
#: of a page then start on page boundaries and a cold read of a row reads no page it does not
#: need. Older stores (no attribute) are read the same way; only their cold reads cost more.
X_ALIGNMENT = 4096
RESERVED_GROUPS = ("stats", "skipped")
#: Stored pixel dtypes of X (``streamnn-pack --dtype``).
STORE_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}
CHANNEL_ORDERS = ("BGR", "RGB", "GRAY")
COMPRESSIONS = (None, "lzf", "gzip")
#: HDF5 dtype of the stored strings (class names, paths).
STRING_DTYPE = h5py.string_dtype("utf-8")


def as_text(value: Any) -> Any:
    """A string as h5py reads it (bytes) as str, undecodable bytes kept as surrogates; other values as they are."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def checked_split(f: h5py.File, split: str, fingerprint: str | None, where: Any) -> h5py.Dataset:
    """The X of ``split`` in the store ``f`` (named ``where`` in errors), once ``f`` is a streamnn
    store and, if ``fingerprint`` is given, still the store of that content fingerprint."""
    if as_text(f.attrs.get("format")) != FORMAT:
        raise StreamnnError("not a streamnn store (no 'format = streamnn-store' attribute)", where)
    fp = str(as_text(f.attrs.get("fingerprint")))
    if fingerprint is not None and fp != fingerprint:
        raise StreamnnError(f"the store changed since the loader was made (content fingerprint "
                            f"{fp[:12]}..., expected {fingerprint[:12]}...)", where)
    if split not in f or "X" not in f[split]:
        raise StreamnnError(f"unknown split {split!r}", where)
    return f[split]["X"]


def fingerprint(class_names: Sequence[str], image_shape: Sequence[int],
                splits: Iterable[tuple[str, np.ndarray, Sequence[str]]]) -> str:
    """sha256 over class names, image shape and each split's (name, labels, paths), in order."""
    h = hashlib.sha256()
    h.update(json.dumps([list(class_names), [int(s) for s in image_shape]]).encode())
    for name, y, paths in sorted(splits, key=lambda s: s[0]):
        h.update(b"\0split\0" + name.encode())
        h.update(np.ascontiguousarray(y, dtype="<i4").tobytes())
        for p in paths:
            h.update(p.encode() + b"\0")
    return h.hexdigest()


def x_layout(dset: h5py.Dataset, split: str, shards: Sequence[Path] = ()) -> dict[str, Any]:
    """Where the rows of ``dset`` (a split's X; virtual: over ``shards``) lie: ``storage``
    ("contiguous", "chunked" or "virtual"), ``row_bytes``, ``offsets`` (of X in each file that
    holds its rows, the store or every shard; None where chunked), ``start_aligned``: X starts
    at a multiple of :data:`X_ALIGNMENT` in every file (or is smaller than that: HDF5 aligns
    only objects of at least that size), and ``page_aligned``: every row does."""
    row_bytes = int(dset.shape[1]) * dset.dtype.itemsize
    parts: list[tuple[int | None, int]] = []  # (offset, rows) per file
    if dset.is_virtual:
        for shard in shards:
            with h5py.File(shard, "r") as f:
                part = f[split]["X"]
                parts.append((part.id.get_offset(), int(part.shape[0])))
    else:
        parts.append((dset.id.get_offset(), int(dset.shape[0])))
    storage = "virtual" if dset.is_virtual else "chunked" if dset.chunks is not None else "contiguous"
    start = storage != "chunked" and all(rows * row_bytes < X_ALIGNMENT or (o is not None and o % X_ALIGNMENT == 0)
                                         for o, rows in parts)
    return {"storage": storage, "row_bytes": row_bytes, "offsets": [None if o is None else int(o) for o, _ in parts],
            "start_aligned": start, "page_aligned": start and row_bytes % X_ALIGNMENT == 0}


def layout_text(layout: dict[str, Any]) -> str:
    """One line on how a split's rows lie in its file(s) (:func:`x_layout`), for ``streamnn-info``."""
    size = layout["row_bytes"]
    if layout["storage"] == "chunked":
        return f"rows of {size:,} bytes in chunks (read a chunk at a time)"
    pages = f" ({size // X_ALIGNMENT} pages)" if size % X_ALIGNMENT == 0 else ""
    if layout["page_aligned"]:
        return f"rows of {size:,} bytes{pages}, each starting on a page boundary"
    if layout["start_aligned"]:
        return f"rows of {size:,} bytes from a page boundary on (not whole pages: a row may straddle two)"
    return (f"rows of {size:,} bytes{pages} from byte {layout['offsets'][0] or 0:,} on, not page-aligned (packed "
            f"before streamnn aligned X: a cold read of a row can read a page more; pack again to align)")


# -- sharded stores -------------------------------------------------------------------------------
FOLDER_SUFFIX = ".shards"
#: File name of a shard, ``part-<r>-of-<K>.h5``.
PART_PATTERN = re.compile(r"part-(\d+)-of-(\d+)\.h5")


def shard_folder(index: str | os.PathLike) -> Path:
    """``OUT.h5.shards`` beside the index ``OUT.h5``: named from the whole file name, so that
    no two indexes (``a.h5``, ``a.hdf5``, ``a``) share one folder."""
    index = Path(index)
    return index.with_name(index.name + FOLDER_SUFFIX)


def part_name(rank: int, size: int) -> str:
    return f"part-{rank}-of-{size}.h5"


# -- integrity -----------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return as_text(value)
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def metadata_digest(f: h5py.File) -> str:
    """sha256 of a store file's root attributes and the shapes of its split datasets."""
    shapes: dict[str, Any] = {}
    f.visititems(lambda name, obj: shapes.__setitem__(name, list(obj.shape)) if isinstance(obj, h5py.Dataset)
                 else None)
    meta = {"attrs": {k: _plain(v) for k, v in f.attrs.items()}, "shapes": shapes}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode("utf-8", "surrogateescape")).hexdigest()


def shard_record(path: Path, relative: str) -> dict[str, Any]:
    """What the index records about a shard: file (relative), size, fingerprint, metadata digest."""
    with h5py.File(path, "r") as f:
        fp, digest = _plain(f.attrs["fingerprint"]), metadata_digest(f)
    return {"file": relative, "size": path.stat().st_size, "fingerprint": fp, "metadata_sha256": digest}


def shard_records(records_json: Any, index: Path) -> list[dict[str, Any]]:
    """The shard records of an index (its ``shards`` attribute, JSON)."""
    try:
        records = json.loads(_plain(records_json))
        if not all(isinstance(r, dict) and "file" in r for r in records):
            raise TypeError
    except (ValueError, TypeError):
        raise StreamnnError("the index's 'shards' attribute is unreadable", path_text(index)) from None
    for record in records:
        if not plain_relative(record["file"]):
            raise StreamnnError(f"the index names shard {str(record['file'])[:200]!r}, which is not a plain relative "
                                f"path inside the store's folder (absolute, '..', '.' or not in normal form)",
                                path_text(index))
    return records


def plain_relative(name: object) -> bool:
    """Whether a shard's recorded file name is a normalized relative POSIX path that stays in the
    index's folder (no root, no '..' or '.', no empty part): the one form every reader resolves
    the same way (index folder / name) as the integrity check."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        return False
    pure = PurePosixPath(name)
    return (bool(pure.parts) and not pure.is_absolute() and str(pure) == name and ".." not in pure.parts
            and "." not in pure.parts and name != ".")


def check_index(f: h5py.File, index: Path, records_json: Any) -> list[Path]:
    """Check every shard an index records (exists, same size, fingerprint and metadata digest)
    and that its virtual datasets read nothing else; return the shard paths.

    HDF5 would resolve the virtual datasets' files against ``HDF5_VDS_PREFIX`` (an environment
    variable that overrides their recorded folder), reading rows or labels of other files than
    the ones checked here: a sharded store is refused while it is set."""
    if os.environ.get("HDF5_VDS_PREFIX"):
        raise StreamnnError("HDF5_VDS_PREFIX is set, which would make HDF5 read the shards from another "
                            "folder than the index records: unset it to read this sharded store", path_text(index))
    records = shard_records(records_json, index)
    files = [str(r["file"]) for r in records]
    folder = index.parent
    paths = []
    for record in records:
        path = folder / record["file"]
        if not path.is_file():
            raise StreamnnError(f"shard {record['file']} is missing (the store is incomplete)", path_text(index))
        size = path.stat().st_size
        if size != record["size"]:
            raise StreamnnError(f"shard {record['file']} was altered (size {size} bytes, the index "
                                f"recorded {record['size']})", path_text(index))
        try:
            actual = shard_record(path, record["file"])
        except (OSError, KeyError):
            raise StreamnnError(f"shard {record['file']} is not a readable store", path_text(index)) from None
        if actual != record:
            raise StreamnnError(f"shard {record['file']} was altered (its fingerprint or metadata "
                                f"differ from what the index recorded)", path_text(index))
        paths.append(path)

    def sources(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            for source in obj.virtual_sources():
                if source.file_name not in files:
                    raise StreamnnError(f"dataset {name} reads {source.file_name}, which is not a "
                                        f"recorded shard", path_text(index))

    f.visititems(sources)
    return paths


# -- a sharded split's rows ----------------------------------------------------------------------
def segments(f: h5py.File, index: Path, split: str) -> list[tuple[Path, int]]:
    """A virtual split's X as (shard file, rows) in row order (the readers check that each
    source is the whole of the shard's X)."""
    dset, out, start = f[split]["X"], [], 0
    for source in dset.virtual_sources():
        lo, hi = source.vspace.get_select_bounds()
        rows = hi[0] - lo[0] + 1
        if lo[0] != start or source.dset_name != f"{split}/X":
            raise StreamnnError(f"split {split!r}: virtual X is not a sequence of whole shards", path_text(index))
        out.append((index.parent / source.file_name, rows))
        start += rows
    if start != dset.shape[0]:
        raise StreamnnError(f"split {split!r}: the shards hold {start} rows, X has {dset.shape[0]}", path_text(index))
    return out
