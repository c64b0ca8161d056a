"""The streamnn HDF5 store: format, reader and writer, documented in one place.

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

:class:`Store` opens and validates a file; :class:`StoreWriter` is the only code that
writes one, atomically (temporary file beside the target, fsync, rename).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import __version__
from .atomic import atomic_output
from .errors import StreamnnError

FORMAT = "streamnn-store"
FORMAT_VERSION = 1
RESERVED_GROUPS = ("stats", "skipped")
DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}
COMPRESSIONS = (None, "lzf", "gzip")
_STR = h5py.string_dtype("utf-8")


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


def _decode(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class Store:
    """A validated, read-only streamnn store. Use as a context manager or call :meth:`close`.

    Metadata is read once on open; row data stays on disk and is read on demand.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StreamnnError("no such store file", self.path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise StreamnnError(f"not an HDF5 file or unreadable ({exc.__class__.__name__})", self.path) from None
        try:
            self._read_metadata()
        except BaseException:
            self._file.close()
            raise

    def _read_metadata(self) -> None:
        f, where = self._file, self.path
        attrs = {k: _decode(v) for k, v in f.attrs.items()}
        if attrs.get("format") != FORMAT:
            raise StreamnnError("not a streamnn store (no 'format = streamnn-store' attribute)", where)
        version = int(attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise StreamnnError(f"store format version {version} is not supported "
                                f"(this streamnn reads version {FORMAT_VERSION})", where)
        try:
            self.class_names = [str(_decode(c)) for c in attrs["class_names"]]
            self.image_shape = tuple(int(s) for s in attrs["image_shape"])
            self.channel_order = str(attrs["channel_order"])
            self.dtype = str(attrs["dtype"])
            self.scale = float(attrs["scale"])
            self.fingerprint = str(attrs["fingerprint"])
            self.options = json.loads(attrs.get("options", "{}"))
            self.command = str(attrs.get("command", ""))
            self.created = str(attrs.get("created", ""))
            self.streamnn_version = str(attrs.get("streamnn_version", ""))
        except KeyError as exc:
            raise StreamnnError(f"store attribute {exc.args[0]!r} is missing", where) from None
        if self.dtype not in DTYPES or len(self.image_shape) != 3:
            raise StreamnnError(f"bad dtype {self.dtype!r} or image shape {self.image_shape}", where)
        self.n_features = int(np.prod(self.image_shape))
        self.splits = [name for name in f if name not in RESERVED_GROUPS and isinstance(f[name], h5py.Group)]
        if not self.splits:
            raise StreamnnError("store has no split", where)
        #: Shard files of a sharded store (its index: see :mod:`streamnn.shards`), checked here.
        self.shards: list[Path] = []
        if "shards" in attrs:
            from .shards import check_index

            self.shards = check_index(f, self.path, attrs["shards"])
        for name in self.splits:
            self._check_split(name)

    def _check_split(self, name: str) -> None:
        group, where = self._file[name], self.path
        for key in ("X", "y", "paths"):
            if key not in group:
                raise StreamnnError(f"split {name!r} has no dataset {key!r}", where)
        X, y, paths = group["X"], group["y"], group["paths"]
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise StreamnnError(f"split {name!r}: X has shape {X.shape}, expected (N, {self.n_features})", where)
        if np.dtype(X.dtype) != np.dtype(DTYPES[self.dtype]):
            raise StreamnnError(f"split {name!r}: X is {X.dtype}, the store says {self.dtype}", where)
        if y.shape != (X.shape[0],) or paths.shape != (X.shape[0],):
            raise StreamnnError(f"split {name!r}: X has {X.shape[0]} rows but y has {y.shape[0] if y.ndim else 0} "
                                f"and paths {paths.shape[0] if paths.ndim else 0}", where)

    # -- metadata -----------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(self.n_rows(s) for s in self.splits)

    def n_rows(self, split: str) -> int:
        """Number of rows (images) in ``split``."""
        return int(self.dataset(split).shape[0])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def dataset(self, split: str, key: str = "X") -> h5py.Dataset:
        """The h5py dataset ``key`` ("X", "y" or "paths") of ``split``."""
        if split not in self.splits:
            raise StreamnnError(f"unknown split {split!r} (the store has {', '.join(self.splits)})", self.path)
        return self._file[split][key]

    def labels(self, split: str) -> np.ndarray:
        """All labels of ``split`` (small: 4 bytes per row)."""
        return self.dataset(split, "y")[...].astype(np.int64)

    def paths(self, split: str) -> list[str]:
        """Source path of every row of ``split``."""
        return [_decode(p) for p in self.dataset(split, "paths")[...]]

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per split and class."""
        return {s: {c: int(n) for c, n in zip(self.class_names,
                                                np.bincount(self.labels(s), minlength=self.n_classes))}
                for s in self.splits}

    def stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-feature (mean, std) of the normalized training split, or None if not stored."""
        if "stats" not in self._file:
            return None
        return self._file["stats/mean"][...], self._file["stats/std"][...]

    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that was not packed."""
        if "skipped" not in self._file:
            return []
        g = self._file["skipped"]
        return [(_decode(p), _decode(r)) for p, r in zip(g["paths"][...], g["reasons"][...])]

    # -- data -----------------------------------------------------------------------------
    def normalize(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Stored rows to normalized float32 in [0, 1] (``out`` may be reused)."""
        if out is None:
            out = np.empty(rows.shape, np.float32)
        np.copyto(out, rows, casting="unsafe")
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return out

    def read_rows(self, split: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Normalized float32 rows (B, D) at ``indices`` (any order, repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64)
        order = np.unique(idx)
        rows = self.dataset(split)[order] if len(order) else np.empty((0, self.n_features), DTYPES[self.dtype])
        return self.normalize(rows[np.searchsorted(order, idx)])

    def images(self, rows: np.ndarray) -> np.ndarray:
        """Normalized rows (B, D) back to uint8 images (B, H, W, C) in the stored channel order."""
        return np.clip(np.rint(rows * 255.0), 0, 255).astype(np.uint8).reshape((-1, *self.image_shape))

    def verify(self) -> None:
        """Recompute the content fingerprint; raise if the store was altered."""
        actual = fingerprint(self.class_names, self.image_shape,
                             [(s, self.labels(s), self.paths(s)) for s in self.splits])
        if actual != self.fingerprint:
            raise StreamnnError("content does not match its fingerprint (store altered or corrupt)", self.path)
        for shard in self.shards:
            with Store(shard) as part:
                part.verify()

    def loader(self, split: str, batch_size: int = 64, **kwargs: Any):
        """A shuffling mini-batch iterator over ``split``; see :class:`streamnn.loader.Loader`."""
        from .loader import Loader

        return Loader(self.path, split, batch_size=batch_size, **kwargs)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.n_rows(s)}" for s in self.splits)
        return f"Store({str(self.path)!r}, {sizes}, classes={self.class_names}, image_shape={self.image_shape})"


def open_store(path: str | os.PathLike) -> Store:
    """Open and validate a streamnn store for reading."""
    return Store(path)


class StoreWriter:
    """Writes a store split by split into a temporary file; :meth:`commit` renames it into place.

    Usage::

        with StoreWriter(out, class_names=..., image_shape=(64, 64, 3)) as w:
            w.add_split("train", capacity=n)         # preallocated contiguous X
            w.write_rows("train", pixels_uint8, labels, paths)   # appended in order
            w.set_stats(mean, std); w.set_skipped(skips)
            w.commit()

    Rows are given as uint8 pixels (B, H, W, C) or (B, D) and converted to the stored dtype.
    A split that ends with fewer rows than its capacity (skipped files) is compacted on commit.
    Leaving the ``with`` block without :meth:`commit` removes the temporary file.
    """

    def __init__(self, path: str | os.PathLike, *, class_names: Sequence[str], image_shape: Sequence[int],
                 dtype: str = "float32", compression: str | None = None, channel_order: str = "BGR",
                 command: str = "", options: dict[str, Any] | None = None) -> None:
        if dtype not in DTYPES:
            raise StreamnnError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        if compression not in COMPRESSIONS:
            raise StreamnnError(f"unknown compression {compression!r} (choose lzf or gzip)")
        self.path = Path(path)
        self.class_names = list(class_names)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.dtype, self.compression = dtype, compression
        self.n_features = int(np.prod(self.image_shape))
        self._attrs = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "streamnn_version": __version__,
            "command": command, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "class_names": np.array(self.class_names, dtype=_STR), "image_shape": np.array(self.image_shape),
            "pixel_layout": "HWC", "channel_order": channel_order, "dtype": dtype,
            "scale": 1.0 / 255.0 if dtype == "uint8" else 1.0, "options": json.dumps(options or {}, sort_keys=True),
        }
        self._filled: dict[str, int] = {}
        self._done = False
        self._atomic = atomic_output(self.path)
        self._tmp = self._atomic.__enter__()
        self._file = h5py.File(self._tmp, "w")

    def add_split(self, name: str, capacity: int) -> None:
        """Create split ``name`` with room for ``capacity`` rows."""
        if name in RESERVED_GROUPS or name in self._filled:
            raise StreamnnError(f"bad or duplicate split name {name!r}")
        g = self._file.create_group(name)
        self._create_x(g, capacity)
        g.create_dataset("y", shape=(capacity,), dtype=np.int32)
        g.create_dataset("paths", shape=(capacity,), dtype=_STR)
        self._filled[name] = 0

    def add_virtual_split(self, name: str, parts: Sequence[tuple[str, int]]) -> None:
        """Create split ``name`` as HDF5 virtual datasets X, y, paths: the same datasets of
        ``parts``, (store file relative to this store's folder, rows), one after the other."""
        if name in RESERVED_GROUPS or name in self._filled:
            raise StreamnnError(f"bad or duplicate split name {name!r}")
        g, n = self._file.create_group(name), sum(rows for _, rows in parts)
        for key, dtype, width in (("X", DTYPES[self.dtype], (self.n_features,)), ("y", np.int32, ()),
                                  ("paths", _STR, ())):
            layout, start = h5py.VirtualLayout(shape=(n, *width), dtype=dtype), 0
            for file, rows in parts:
                if rows:
                    layout[start:start + rows] = h5py.VirtualSource(file, f"{name}/{key}", shape=(rows, *width))
                    start += rows
            g.create_virtual_dataset(key, layout, fillvalue=None)
        self._filled[name] = n

    def set_attribute(self, name: str, value: Any) -> None:
        """An extra root attribute (a sharded store's ``shards`` records)."""
        self._attrs[name] = value

    def _create_x(self, group: h5py.Group, n: int) -> h5py.Dataset:
        kw: dict[str, Any] = {}
        if self.compression:
            rows = max(1, min(n, (1 << 20) // (self.n_features * np.dtype(DTYPES[self.dtype]).itemsize) or 1))
            kw = {"chunks": (rows, self.n_features), "compression": self.compression}
        return group.create_dataset("X", shape=(n, self.n_features), dtype=DTYPES[self.dtype], **kw)

    def to_stored(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels to rows of the stored dtype."""
        rows = pixels.reshape(len(pixels), self.n_features)
        if self.dtype == "uint8":
            return rows
        return (rows.astype(np.float32) * np.float32(1 / 255)).astype(DTYPES[self.dtype], copy=False)

    def write_rows(self, split: str, pixels: np.ndarray, labels: Sequence[int], paths: Sequence[str]) -> None:
        """Append uint8 images (B, H, W, C) with their labels and source paths to ``split``."""
        start, n = self._filled[split], len(pixels)
        if n == 0:
            return
        g = self._file[split]
        g["X"][start:start + n] = self.to_stored(np.asarray(pixels, dtype=np.uint8))
        g["y"][start:start + n] = np.asarray(labels, dtype=np.int32)
        g["paths"][start:start + n] = np.array(list(paths), dtype=object)
        self._filled[split] = start + n

    def set_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Per-feature mean and std of the normalized training split."""
        g = self._file.require_group("stats")
        g.create_dataset("mean", data=np.asarray(mean, np.float64))
        g.create_dataset("std", data=np.asarray(std, np.float64))

    def set_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Record (path, reason) of every file not packed."""
        g = self._file.require_group("skipped")
        g.create_dataset("paths", data=np.array([p for p, _ in skipped], dtype=object), dtype=_STR)
        g.create_dataset("reasons", data=np.array([r for _, r in skipped], dtype=object), dtype=_STR)

    def commit(self) -> str:
        """Finish the file (attributes, fingerprint), fsync it and rename it into place. Returns the fingerprint."""
        splits = [(s, self._file[s]["y"][:n], [_decode(p) for p in self._file[s]["paths"][:n]])
                  for s, n in self._filled.items()]
        counts = {s: dict(zip(self.class_names, np.bincount(y, minlength=len(self.class_names)).tolist()))
                  for s, y, _ in splits}
        self._attrs.update(counts=json.dumps(counts), fingerprint=fingerprint(self.class_names, self.image_shape, splits))
        for k, v in self._attrs.items():
            self._file.attrs[k] = v
        if any(self._file[s]["X"].shape[0] != n for s, n in self._filled.items()):
            self._compact()
        else:
            self._file.close()
        self._done = True
        self._atomic.__exit__(None, None, None)
        return str(self._attrs["fingerprint"])

    def _compact(self) -> None:
        """Rewrite the file with every split cut to the rows written (skipped files leave
        preallocated rows unused, and contiguous datasets cannot shrink)."""
        src = self._file
        with atomic_output(self._tmp) as tmp2:
            with h5py.File(tmp2, "w") as dst:
                for k, v in src.attrs.items():
                    dst.attrs[k] = v
                for name in src:
                    if name not in self._filled:
                        src.copy(src[name], dst, name=name)
                        continue
                    n, old, g = self._filled[name], src[name], dst.create_group(name)
                    new_x = self._create_x(g, n)
                    step = max(1, (32 << 20) // (self.n_features * new_x.dtype.itemsize))
                    for i in range(0, n, step):
                        new_x[i:i + step] = old["X"][i:min(n, i + step)]
                    g.create_dataset("y", data=old["y"][:n])
                    g.create_dataset("paths", data=old["paths"][:n], dtype=_STR)
            src.close()

    def abort(self) -> None:
        """Discard everything written."""
        if self._file.id.valid:
            self._file.close()
        self._done = True
        self._atomic.__exit__(StreamnnError, StreamnnError("aborted"), None)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()
