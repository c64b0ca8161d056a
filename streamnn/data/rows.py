"""One split of a store as random-access rows, the base of the framework adapters' map-style datasets.

:class:`SplitRows` reads the split's metadata once, when it is made, and reads given rows as
normalized float32 in whichever process asks: the row reader and the labels are opened lazily in
that process (again after a fork), and a pickled copy keeps only the settings, so a copy sent to a
worker process opens the store itself. PyTorch's :class:`~streamnn.torch.StoreDataset` and Grain's
:class:`~streamnn.grain.StoreSource` are built on it.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from streamnn.data.readers import RowReader, open_rows
from streamnn.data.store import open_store

__all__ = ["SplitRows"]


class SplitRows:
    """The rows of ``split`` of ``store`` by stored row number; ``reader``: as :func:`open_rows`."""

    #: The labels' dtype (an adapter sets its framework's).
    label_dtype: type = np.int64

    def __init__(self, store: str | os.PathLike, split: str, *, reader: str = "auto") -> None:
        self.path, self.split, self.reader_choice = os.fspath(store), str(split), reader
        with open_store(self.path) as s:
            s.dataset(self.split)  # an unknown split is a one-line error
            self.fingerprint, self.class_names = s.fingerprint, list(s.class_names)
            self.image_shape, self.n_rows = tuple(s.image_shape), s.n_rows(self.split)
        self._reader: RowReader | None = None
        self._labels: np.ndarray | None = None
        self._pid = 0

    def __len__(self) -> int:
        return self.n_rows

    def _open(self) -> tuple[RowReader, np.ndarray]:
        """This process's reader and labels (opened on first use, and again in a forked child)."""
        if self._reader is None or self._labels is None or self._pid != os.getpid():
            self._reader = open_rows(self.path, self.split, fingerprint=self.fingerprint, reader=self.reader_choice)
            with open_store(self.path) as s:
                self._labels = s.labels(self.split).astype(self.label_dtype)
            self._pid = os.getpid()
        return self._reader, self._labels

    def read(self, rows: Any) -> tuple[np.ndarray, np.ndarray]:
        """Stored rows ``rows`` (any order, repeats allowed) as a new (b, D) float32 array of
        normalized pixels that the caller owns, and their labels (``label_dtype``)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        bad = rows[(rows < 0) | (rows >= self.n_rows)]
        if bad.size:
            raise IndexError(f"row {bad[0]} out of range 0..{self.n_rows - 1} of split {self.split!r}")
        reader, labels = self._open()
        buf = np.empty((len(rows), reader.n_features), np.float32)
        got = reader.read(rows, buf)
        if got is not buf:
            np.copyto(buf, got)  # the reader's own buffer, lent: copied
        return buf, labels[rows]

    def __getstate__(self) -> dict[str, Any]:
        """The settings only: each process opens the store itself."""
        state = self.__dict__.copy()
        state["_reader"], state["_labels"] = None, None
        return state

    def close(self) -> None:
        """Close this process's reader (a later read opens another)."""
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader, self._labels = None, None
