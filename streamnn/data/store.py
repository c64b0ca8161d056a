"""The streamnn HDF5 store: open, check and read (:class:`Store`).

The format is docs/format.md (its constants: :mod:`streamnn.data.format`). :class:`Store` opens and validates
a file (with :class:`~streamnn.data.checker.Checker`); :class:`~streamnn.data.writer.StoreWriter` writes one.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from streamnn.errors import StreamnnError
from streamnn.paths import path_text
from streamnn.data.readers.base import normalize_into
from streamnn.data.remote import is_url, location
from streamnn.data.format import (CHANNEL_ORDERS, FORMAT, FORMAT_VERSION, RESERVED_GROUPS, STORE_DTYPES, as_text,
                                  check_index, fingerprint, x_layout)
from streamnn.data.checker import Checker, is_int, shown, valid_text


def _printable(value: Any) -> str:
    """A stored path or reason as text; a damaged one (not UTF-8) in the lossless escaped form."""
    text = as_text(value)
    return text if valid_text(text) else path_text(text.encode("utf-8", "surrogateescape"))


READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeDecodeError, AttributeError)


def read_error(exc: BaseException, path: str | os.PathLike) -> StreamnnError:
    """An exception h5py/HDF5 raised while reading a store, as the one-line error naming the file."""
    text = " ".join(str(exc).split())[:160]
    return StreamnnError(f"cannot read the store (damaged file?): {exc.__class__.__name__}: {text}", path_text(path))


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Inside, an h5py/HDF5 exception becomes :func:`read_error` (StreamnnError passes through)."""
    try:
        yield
    except StreamnnError:
        raise
    except READ_ERRORS as exc:
        raise read_error(exc, path) from None


def checked_batches(batches: Iterable[tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
                    split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``batches`` (a loader over ``split`` of the store ``path``), with read errors turned into
    one-line errors and every batch checked finite (see "Pixel values" in docs/format.md)."""
    it = iter(batches)
    while True:
        with reading(path):
            try:
                X, Y = next(it)
            except StopIteration:
                return
        if X.dtype.kind == "f" and not np.isfinite(X.sum()) and not np.isfinite(X).all():
            raise StreamnnError(f"split {split!r} holds non-finite pixel values (NaN or inf)", path_text(path))
        yield X, Y



class Store:
    """A validated, read-only streamnn store. Use as a context manager or call :meth:`close`.

    Metadata is read and checked against the format once, on open (see "Validation" in
    docs/format.md); row data stays on disk and is read on demand.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        #: A ``Path``, or the URL (str) of a store read over the network (docs/remote.md).
        self.path: Any = location(path)
        if is_url(self.path):
            from streamnn.data.remote.rangefile import open_h5
            self._file = open_h5(self.path)  # the metadata, read once through a block cache
        else:
            if not self.path.is_file():
                raise StreamnnError("no such store file" if not os.path.lexists(self.path) else
                                    "is not a regular file", path_text(self.path))
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise StreamnnError(f"not an HDF5 file or unreadable ({exc.__class__.__name__})",
                                    path_text(self.path)) from None
        try:
            with reading(self.path):
                self._read_metadata()
        except BaseException:
            self._file.close()
            raise

    def _read_metadata(self) -> None:
        c = Checker(self._file, self.path)
        if c.attr("format", required=False) != FORMAT:
            raise c.fail("not a streamnn store (no 'format = streamnn-store' attribute)")
        version = c.attr("format_version")
        if not is_int(version) or int(version) != FORMAT_VERSION:
            raise c.fail(f"store format version {version!r} is not supported (this streamnn reads version "
                         f"{FORMAT_VERSION})")
        names = c.attr("class_names")
        if (not isinstance(names, np.ndarray) or names.ndim != 1 or len(names) < 1
                or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)):
            raise c.fail(f"store attribute 'class_names' must be a list of distinct non-empty strings, "
                         f"not {shown(names)}")
        self.class_names = [str(n) for n in names]
        shape = c.attr("image_shape")
        if (not isinstance(shape, np.ndarray) or shape.shape != (3,) or shape.dtype.kind not in "iu"
                or not (shape > 0).all() or int(np.prod(shape.astype(object))) > 1 << 31):
            raise c.fail(f"store attribute 'image_shape' must be three positive integers (H, W, C), "
                         f"not {shown(shape)}")
        self.image_shape = tuple(int(s) for s in shape)
        self.channel_order = c.text("channel_order", choices=CHANNEL_ORDERS)
        if self.image_shape[2] != (1 if self.channel_order == "GRAY" else 3):
            raise c.fail(f"image_shape {self.image_shape} does not fit channel order {self.channel_order}")
        c.text("pixel_layout", required=False, choices=("HWC",))
        self.dtype = c.text("dtype", choices=tuple(STORE_DTYPES))
        scale = c.attr("scale")
        expected = 1.0 / 255.0 if self.dtype == "uint8" else 1.0
        if (not isinstance(scale, (float, np.floating, int, np.integer)) or isinstance(scale, (bool, np.bool_))
                or not math.isfinite(float(scale)) or not math.isclose(float(scale), expected, rel_tol=1e-6)):
            raise c.fail(f"store attribute 'scale' must be {expected:.6g} for a {self.dtype} store, "
                         f"not {shown(scale)}")
        self.scale = float(scale)
        self.fingerprint = c.text("fingerprint")
        if len(self.fingerprint) != 64 or set(self.fingerprint) - set("0123456789abcdef"):
            raise c.fail("store attribute 'fingerprint' must be 64 hex digits (sha256)")
        alignment = c.attr("x_alignment", required=False)
        if alignment is not None and (not is_int(alignment) or alignment < 1 or alignment & (alignment - 1)):
            raise c.fail(f"store attribute 'x_alignment' must be a power of two, not {shown(alignment)}")
        #: The alignment new stores are written with (bytes; None: a store written before it).
        self.x_alignment = None if alignment is None else int(alignment)
        self.options = c.json_object("options") if "options" in self._file.attrs else {}
        self.command = c.text("command", required=False) or ""
        self.created = c.text("created", required=False) or ""
        self.streamnn_version = c.text("streamnn_version", required=False) or ""
        self.n_features = int(np.prod(self.image_shape))
        for name in self._file:
            c.group(name)  # every top-level member is a group
        self.splits = [name for name in self._file if name not in RESERVED_GROUPS]
        if not self.splits:
            raise c.fail("store has no split")
        #: Shard files of a sharded store (its index: "Sharded stores" in docs/format.md), checked
        #: before anything is read through its virtual datasets; read by URL, the shards' URLs
        #: (checked when the index was opened, :mod:`streamnn.data.remote.shards`).
        self.shards: list[Path | str] = []
        if "shards" in self._file.attrs:
            if is_url(self.path):
                raise c.fail("a sharded store cannot be read from a URL yet (serve a one-file store)")
            self.shards = list(check_index(self._file, self.path, self._file.attrs["shards"]))
        elif is_url(self.path):
            self.shards = [o.url for o in getattr(self._file._streamnn_source.obj, "shards", ())]
        self._counts = {name: self._check_split(c, name) for name in self.splits}
        recorded = c.json_object("counts")
        if recorded != self._counts:
            raise c.fail("store attribute 'counts' does not match the labels of the splits")
        self._check_stats(c)
        if "skipped" in self._file:
            g = c.group("skipped")
            c.strings(g, "reasons", c.strings(g, "paths").shape[0])

    def _check_split(self, c: Checker, name: str) -> dict[str, int]:
        group = c.group(name)
        X = c.dataset(group, "X", 2)
        n = X.shape[0]
        if X.shape[1] != self.n_features:
            raise c.fail(f"split {name!r}: X has shape {X.shape}, expected (N, {self.n_features})")
        if np.dtype(X.dtype) != np.dtype(STORE_DTYPES[self.dtype]):
            raise c.fail(f"split {name!r}: X is {X.dtype}, the store says {self.dtype}")
        y = c.dataset(group, "y", 1)
        if y.shape[0] != n:
            raise c.fail(f"split {name!r}: X has {n} rows but y has {y.shape[0]}")
        if y.dtype.kind not in "iu":
            raise c.fail(f"split {name!r}: labels y must be integers, not {y.dtype}")
        labels = y[...]
        if n and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise c.fail(f"split {name!r}: labels must be in [0, {self.n_classes - 1}] (one per class), "
                         f"found {int(labels.min())}..{int(labels.max())}")
        c.strings(group, "paths", n)
        counts = np.bincount(labels.astype(np.int64), minlength=self.n_classes)
        return {cls: int(k) for cls, k in zip(self.class_names, counts)}

    def _check_stats(self, c: Checker) -> None:
        if "stats" not in self._file:
            return
        g = c.group("stats")
        for key in ("mean", "std"):
            d = c.dataset(g, key, 1)
            if d.shape != (self.n_features,) or d.dtype.kind != "f":
                raise c.fail(f"dataset 'stats/{key}' must be floats of shape ({self.n_features},), "
                             f"not {d.dtype} {d.shape}")
            values = d[...]
            if not np.isfinite(values).all() or (key == "std" and (values < 0).any()):
                raise c.fail(f"dataset 'stats/{key}' holds " + ("non-finite values (NaN or inf)"
                                                                if not np.isfinite(values).all() else
                                                                "negative standard deviations"))

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
            raise StreamnnError(f"unknown split {split!r} (the store has {', '.join(self.splits)})",
                                path_text(self.path))
        with reading(self.path):
            return self._file[split][key]

    def layout(self, split: str) -> dict[str, Any]:
        """Where ``split``'s rows lie in the file(s) (:func:`~streamnn.data.format.x_layout`)."""
        with reading(self.path):
            return x_layout(self.dataset(split), split, self.shards)

    def labels(self, split: str) -> np.ndarray:
        """All labels of ``split`` (small: 4 bytes per row)."""
        with reading(self.path):
            return self.dataset(split, "y")[...].astype(np.int64)

    def paths(self, split: str) -> list[str]:
        """Source path of every row of ``split``."""
        with reading(self.path):
            return [_printable(p) for p in self.dataset(split, "paths")[...]]

    def paths_at(self, split: str, rows: Sequence[int] | np.ndarray) -> list[str]:
        """Source paths of the given rows of ``split`` (in the order given)."""
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows)
        out: list[str] = [""] * len(rows)
        with reading(self.path):
            for i, p in zip(order, self.dataset(split, "paths")[rows[order]] if len(rows) else []):
                out[i] = _printable(p)
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per split and class."""
        return {s: dict(per_class) for s, per_class in self._counts.items()}

    def stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-feature (mean, std) of the normalized training split, or None if not stored."""
        if "stats" not in self._file:
            return None
        with reading(self.path):
            return self._file["stats/mean"][...], self._file["stats/std"][...]

    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that was not packed."""
        if "skipped" not in self._file:
            return []
        with reading(self.path):
            g = self._file["skipped"]
            return [(_printable(p), _printable(r)) for p, r in zip(g["paths"][...], g["reasons"][...])]

    # -- data -----------------------------------------------------------------------------
    def normalize(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Stored rows to normalized float32 in [0, 1] (``out`` may be reused)."""
        return normalize_into(rows, np.empty(rows.shape, np.float32) if out is None else out, np.float32(self.scale))

    def read_rows(self, split: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Normalized float32 rows (B, D) at ``indices`` (any order, repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64)
        order = np.unique(idx)
        with reading(self.path):
            rows = self.dataset(split)[order] if len(order) else np.empty((0, self.n_features), STORE_DTYPES[self.dtype])
        return self.normalize(rows[np.searchsorted(order, idx)])

    def images(self, rows: np.ndarray) -> np.ndarray:
        """Normalized rows (B, D) back to uint8 images (B, H, W, C) in the stored channel order."""
        return np.clip(np.rint(rows * 255.0), 0, 255).astype(np.uint8).reshape((-1, *self.image_shape))

    def verify(self) -> None:
        """Recompute the content fingerprint; raise if the store was altered."""
        actual = fingerprint(self.class_names, self.image_shape,
                             [(s, self.labels(s), self.paths(s)) for s in self.splits])
        if actual != self.fingerprint:
            raise StreamnnError("content does not match its fingerprint (store altered or corrupt)",
                                path_text(self.path))
        for shard in self.shards:
            with Store(shard) as part:
                part.verify()

    def nbytes(self) -> int:
        """Bytes of the store's files (index and shards), or of the remote object."""
        if is_url(self.path):
            return int(self._file._streamnn_source.size)
        return os.path.getsize(self.path) + sum(os.path.getsize(p) for p in self.shards)

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
