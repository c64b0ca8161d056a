"""Map-style PyTorch dataset of a store split (:class:`StoreDataset`; usage: docs/frameworks.md)."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from streamnn.data.readers import open_rows
from streamnn.data.store import open_store
from streamnn.data.transforms import standardization
from streamnn.errors import StreamnnError
from streamnn.torch.images import Images


class StoreDataset(Dataset):
    """Rows of one split as ``(image, label)`` items (map-style), read in one go per batch.

    ``standardize``: with the store's ``/stats``; ``layout``, ``channels``, ``dtype``: as
    :class:`StoreBatches`; ``transform``: a callable applied to each image tensor.
    """

    def __init__(self, store: str | os.PathLike, split: str, *, standardize: bool = False, layout: str = "NCHW",
                 channels: str = "RGB", dtype: Any = "float32", transform: Any = None, reader: str = "auto") -> None:
        self.path, self.split, self.reader_choice = os.fspath(store), str(split), reader
        with open_store(self.path) as s:
            s.dataset(self.split)  # an unknown split is a one-line error
            self.fingerprint, self.class_names = s.fingerprint, list(s.class_names)
            self.n_rows, shape, stats = s.n_rows(self.split), tuple(s.image_shape), s.stats()
        self.images = Images(shape, layout, channels, dtype)
        self._mean = self._inv = None
        if standardize:
            if stats is None:
                raise StreamnnError("standardize needs the store's /stats, which this store does not have", self.path)
            if self.images.dtype == "uint8":
                raise StreamnnError("standardized images are not uint8: use dtype float32 with standardize")
            self._mean, self._inv = standardization(*stats)
        self.transform = transform
        self._reader: Any = None
        self._labels: np.ndarray | None = None
        self._pid = 0

    def __len__(self) -> int:
        return self.n_rows

    def _open(self) -> None:
        if self._reader is None or self._pid != os.getpid():
            self._reader = open_rows(self.path, self.split, fingerprint=self.fingerprint, reader=self.reader_choice)
            with open_store(self.path) as s:
                self._labels = s.labels(self.split).astype(np.int64)
            self._pid = os.getpid()

    def __getitems__(self, indices: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"row index out of range 0..{self.n_rows - 1} of split {self.split!r}")
        self._open()
        buf = np.empty((len(rows), self._reader.n_features), np.float32)
        got = self._reader.read(rows, buf)
        if got is not buf:
            np.copyto(buf, got)  # the reader's own buffer, lent: copied
        if self._mean is not None:
            buf -= self._mean
            buf *= self._inv
        images = self.images(buf)
        labels = torch.from_numpy(self._labels[rows])  # type: ignore[index]
        items = [(images[j], labels[j]) for j in range(len(rows))]
        if self.transform is not None:
            items = [(self.transform(x), y) for x, y in items]
        return items

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"], state["_labels"] = None, None
        return state

    def close(self) -> None:
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader = None
