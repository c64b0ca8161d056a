"""The store format: its constants, content fingerprint, and a sharded store's layout and index
integrity (the format is described in docs/format.md).

Format version 1 (``format = "streamnn-store"``)::

    /                       root attributes:
        format              "streamnn-store"
        format_version      1
        streamnn_version    version that wrote the file
        command             the command line that made it
        created             ISO 8601 UTC time
        class_names         label i is class_names[i]
        image_shape         (H, W, C)
        pixel_layout        "HWC": a row is the image flattened in H x W x C order
        channel_order       "BGR" (as OpenCV decodes) or "GRAY"
        dtype               stored dtype: "float32" | "float16" | "uint8"
        scale               normalized = stored * scale, in [0, 1] (1.0 or 1/255)
        options             JSON of the packing options
        counts              JSON {split: {class_name: count}}
        fingerprint         sha256 hex of class names, image shape and every split's
                            labels and paths (content identity for checkpoints)
    /<split>/X              (N, D) stored dtype, D = H*W*C, one image per row
    /<split>/y              (N,) int32 labels
    /<split>/paths          (N,) UTF-8 source path of each row, relative to the source root
    /stats/mean, /stats/std (D,) float64, of the normalized training split (absent if none)
    /skipped/paths, /skipped/reasons   files that were not packed, and why

Splits are the groups other than ``stats`` and ``skipped``. The Kaggle folders map to
``train`` (training_set) and ``test`` (test_set). X is uncompressed and contiguous by
default: the loader's random row reads are then a gather from a memory map of the file.

Sharded stores: one logical store over several files (the index and its shards).

*Layout.* ``OUT.h5`` is the *index*; its shards are ``OUT.h5.shards/part-<r>-of-<K>.h5`` (the
folder is named from the index's whole file name, so it belongs to that one index; release
0.1.0 named it from the stem, ``OUT.shards``, and reading follows the paths the index records,
so those stores still open). Each
shard is itself a complete streamnn store (same attributes and options, plus
``options.shard = [r, K]`` and ``options.index``, the resolved path of the index it was
written for: :mod:`streamnn.pack.shardfolder`) holding rank r's share of every split: rows
``[floor(r n / K), floor((r + 1) n / K))`` of the split's row order (the one-file store's
order, drawn from the seed), minus the files that failed to decode. The index has the
one-file store's attributes, class names, counts, skipped files, statistics and fingerprint;
its ``/<split>/X``, ``y`` and ``paths`` are HDF5 virtual datasets over the shards' datasets,
in rank order, with source paths relative to the index's folder (the pair can be moved or
copied together), so h5py or HDFView users see one store. Whatever K, the index holds
exactly the rows, labels, order, statistics and fingerprint of the one-file store: the rows
are the same and in the same order, the statistics come from exact integer sums
(:class:`~streamnn.pack.job.RunningMoments`, summed across ranks by an integer reduction), and
the fingerprint is computed over the labels and paths read through the virtual datasets.

*Integrity.* HDF5 reads the fill value (zeros) where a virtual dataset's source file is
missing, silently. So the index records, in its root attribute ``shards`` (JSON), each
shard's file name, size, own fingerprint and a digest of its metadata (root attributes and
dataset shapes, :func:`metadata_digest`); :func:`check_index` (run by every
:class:`~streamnn.data.store.Store` open and by every row reader open) stops with a one-line
error naming the shard that is missing, altered or not recorded. ``Store.verify`` also
verifies every shard's own fingerprint.

*Reading* a sharded split: :mod:`streamnn.data.readers.segments`; packing one: :mod:`streamnn.pack.sharded`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from streamnn.errors import StreamnnError
from streamnn.paths import path_text

FORMAT = "streamnn-store"
FORMAT_VERSION = 1
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
    return records


def check_index(f: h5py.File, index: Path, records_json: Any) -> list[Path]:
    """Check every shard an index records (exists, same size, fingerprint and metadata digest)
    and that its virtual datasets read nothing else; return the shard paths."""
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
