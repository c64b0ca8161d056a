"""Writing a streamnn store (:class:`StoreWriter`), atomically: a temporary file beside the target,
fsync, rename (the format: docs/format.md). The only code that writes a store.

A failed write is one StreamnnError and leaves nothing behind (:mod:`streamnn.h5write`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Iterator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from streamnn.atomic import atomic_output
from streamnn.data.format import (COMPRESSIONS, FORMAT, FORMAT_VERSION, RESERVED_GROUPS, STORE_DTYPES, STRING_DTYPE,
                                  X_ALIGNMENT, as_text, fingerprint)
from streamnn.errors import StreamnnError
from streamnn.h5write import checked_flush, close_hard, failure_text, flush_close
from streamnn.paths import path_text
from streamnn.version import __version__


def check_storage(dtype: str, compression: str | None) -> None:
    """Raise unless ``dtype`` is a stored pixel type and ``compression`` an X compression of the format."""
    if dtype not in STORE_DTYPES:
        raise StreamnnError(f"unknown dtype {dtype!r} (choose from {', '.join(STORE_DTYPES)})")
    if compression not in COMPRESSIONS:
        raise StreamnnError(f"unknown compression {compression!r} (choose from {', '.join(map(str, COMPRESSIONS))})")


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
        check_storage(dtype, compression)
        self.path = Path(path)
        self.class_names = list(class_names)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.dtype, self.compression = dtype, compression
        self.n_features = int(np.prod(self.image_shape))
        self._attrs = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "streamnn_version": __version__,
            "command": command, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "class_names": np.array(self.class_names, dtype=STRING_DTYPE), "image_shape": np.array(self.image_shape),
            "pixel_layout": "HWC", "channel_order": channel_order, "dtype": dtype,
            "scale": 1.0 / 255.0 if dtype == "uint8" else 1.0, "options": json.dumps(options or {}, sort_keys=True),
            "x_alignment": X_ALIGNMENT,
        }
        self._filled: dict[str, int] = {}
        #: The datasets of each split (X, y, paths), held open so that none is closed by a
        #: finalizer; the labels and paths of virtual splits, read from their parts.
        self._datasets: dict[str, tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset]] = {}
        self._virtual: dict[str, tuple[np.ndarray, list[str]]] = {}
        #: Other datasets written, held until their file is flushed and closed (a dataset closed
        #: alone flushes its own buffer, and a failure there leaves HDF5 in a state it cannot close).
        self._held: list[h5py.Dataset] = []
        self._open: list[h5py.File] = []  # HDF5 files being written (closed hard on failure)
        self._done = False
        self._atomic = atomic_output(self.path)
        self._tmp = self._atomic.__enter__()
        with self._writing():
            self._file = self._create(self._tmp)

    def _create(self, path: Path) -> h5py.File:
        # Every object of a page or more (X, and each chunk of a compressed X) starts on a page.
        f = h5py.File(path, "w", alignment_threshold=X_ALIGNMENT, alignment_interval=X_ALIGNMENT)
        self._open.append(f)
        return f

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Inside, a failure closes every file being written (:func:`close_hard`), removes the
        temporaries and becomes one StreamnnError naming the target (a StreamnnError, a Ctrl-C
        also discard everything, and pass through)."""
        try:
            yield
        except BaseException as exc:
            self._discard(exc)
            if isinstance(exc, (OSError, RuntimeError, ValueError, KeyError, TypeError)):
                raise StreamnnError(failure_text(exc), path_text(self.path)) from None
            raise

    def _discard(self, exc: BaseException | None = None) -> None:
        """Close every file being written (hard) and remove the temporary file."""
        if self._done:
            return
        self._done = True
        for f in reversed(self._open):
            close_hard(f)  # closes the datasets too
        self._open.clear()
        self._datasets.clear()
        self._held.clear()
        error = exc if isinstance(exc, BaseException) else StreamnnError("aborted")
        with contextlib.suppress(OSError, StreamnnError):
            self._atomic.__exit__(type(error), error, None)

    def add_split(self, name: str, capacity: int) -> None:
        """Create split ``name`` with room for ``capacity`` rows."""
        if name in RESERVED_GROUPS or name in self._filled:
            raise StreamnnError(f"bad or duplicate split name {name!r}")
        with self._writing():
            g = self._file.create_group(name)
            self._datasets[name] = (self._create_x(g, capacity), g.create_dataset("y", shape=(capacity,), dtype=np.int32),
                                    g.create_dataset("paths", shape=(capacity,), dtype=STRING_DTYPE))
            self._filled[name] = 0

    def add_virtual_split(self, name: str, parts: Sequence[tuple[str, int]]) -> None:
        """Create split ``name`` as HDF5 virtual datasets X, y, paths: the same datasets of
        ``parts``, (store file relative to this store's folder, rows), one after the other."""
        if name in RESERVED_GROUPS or name in self._filled:
            raise StreamnnError(f"bad or duplicate split name {name!r}")
        with self._writing():
            # The fingerprint's labels and paths are read from the parts themselves, resolved as
            # readers resolve them (beside this store), never through the virtual datasets
            # (HDF5 resolves those through HDF5_VDS_PREFIX first).
            labels, paths = [np.empty(0, np.int32)], []
            for file, rows in parts:
                if rows:
                    with h5py.File(self.path.parent / file, "r") as part:
                        labels.append(part[name]["y"][:rows].astype(np.int32))
                        paths.extend(as_text(p) for p in part[name]["paths"][:rows])
            self._virtual[name] = (np.concatenate(labels), paths)
            g, n = self._file.create_group(name), sum(rows for _, rows in parts)
            for key, dtype, width in (("X", STORE_DTYPES[self.dtype], (self.n_features,)), ("y", np.int32, ()),
                                      ("paths", STRING_DTYPE, ())):
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
            rows = max(1, min(n, (1 << 20) // (self.n_features * np.dtype(STORE_DTYPES[self.dtype]).itemsize) or 1))
            kw = {"chunks": (rows, self.n_features), "compression": self.compression}
        return group.create_dataset("X", shape=(n, self.n_features), dtype=STORE_DTYPES[self.dtype], **kw)

    def to_stored(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels to rows of the stored dtype."""
        rows = pixels.reshape(len(pixels), self.n_features)
        if self.dtype == "uint8":
            return rows
        return (rows.astype(np.float32) * np.float32(1 / 255)).astype(STORE_DTYPES[self.dtype], copy=False)

    def write_rows(self, split: str, pixels: np.ndarray, labels: Sequence[int], paths: Sequence[str]) -> None:
        """Append uint8 images (B, H, W, C) with their labels and source paths to ``split``."""
        start, n = self._filled[split], len(pixels)
        if n == 0:
            return
        X, y, p = self._datasets[split]
        with self._writing():
            X[start:start + n] = self.to_stored(np.asarray(pixels, dtype=np.uint8))
            y[start:start + n] = np.asarray(labels, dtype=np.int32)
            p[start:start + n] = np.array(list(paths), dtype=object)
        self._filled[split] = start + n

    def set_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Per-feature mean and std of the normalized training split."""
        with self._writing():
            g = self._file.require_group("stats")
            self._held += [g.create_dataset("mean", data=np.asarray(mean, np.float64)),
                           g.create_dataset("std", data=np.asarray(std, np.float64))]

    def set_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Record (path, reason) of every file not packed."""
        with self._writing():
            g = self._file.require_group("skipped")
            for key, values in (("paths", [p for p, _ in skipped]), ("reasons", [r for _, r in skipped])):
                self._held.append(g.create_dataset(key, data=np.array(values, dtype=object), dtype=STRING_DTYPE))

    def flush(self) -> None:
        """Write out what HDF5 holds back (the space checked first), so that a later :meth:`commit`
        has nothing left to fail on but its attributes: a caller committing several stores
        together (the shards of a sharded store) flushes them all before renaming any."""
        with self._writing():
            checked_flush(self._file)

    def commit(self) -> str:
        """Finish the file (attributes, fingerprint), fsync it and rename it into place. Returns the fingerprint."""
        with self._writing():
            splits = []
            for s, n in self._filled.items():
                if s in self._virtual:
                    splits.append((s, *self._virtual[s]))
                else:
                    _, y, p = self._datasets[s]
                    splits.append((s, y[:n], [as_text(v) for v in p[:n]]))
            counts = {s: dict(zip(self.class_names, np.bincount(y, minlength=len(self.class_names)).tolist()))
                      for s, y, _ in splits}
            self._attrs.update(counts=json.dumps(counts),
                               fingerprint=fingerprint(self.class_names, self.image_shape, splits))
            for k, v in self._attrs.items():
                self._file.attrs[k] = v
            if any(d[0].shape[0] != self._filled[s] for s, d in self._datasets.items()):
                self._compact()  # closes the file
            else:
                flush_close(self._file)  # closes the datasets too (h5py closes every object of the file)
                self._datasets.clear()
                self._held.clear()
                self._open.clear()
            self._done = True
            self._atomic.__exit__(None, None, None)
        return str(self._attrs["fingerprint"])

    def _compact(self) -> None:
        """Rewrite the file with every split cut to the rows written (skipped files leave
        preallocated rows unused, and contiguous datasets cannot shrink)."""
        src = self._file
        with atomic_output(self._tmp) as tmp2:
            dst = self._create(tmp2)
            for k, v in src.attrs.items():
                dst.attrs[k] = v
            for name in src:
                if name not in self._datasets:
                    src.copy(src[name], dst, name=name)
                    continue
                n, (old_x, old_y, old_p), g = self._filled[name], self._datasets[name], dst.create_group(name)
                new_x = self._create_x(g, n)
                step = max(1, (32 << 20) // (self.n_features * new_x.dtype.itemsize))
                for i in range(0, n, step):
                    new_x[i:i + step] = old_x[i:min(n, i + step)]
                self._held += [new_x, g.create_dataset("y", data=old_y[:n]),
                               g.create_dataset("paths", data=old_p[:n], dtype=STRING_DTYPE)]
            flush_close(dst)
            self._open.remove(dst)
            flush_close(src)
            self._open.remove(src)
            self._datasets.clear()  # closed with src
            self._held.clear()

    def abort(self) -> None:
        """Discard everything written."""
        self._discard()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self._discard(exc[1] if isinstance(exc[1], BaseException) else None)
