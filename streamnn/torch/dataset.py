"""Map-style PyTorch dataset of a store split (:class:`StoreDataset`; usage: docs/frameworks.md)."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from streamnn.data.rows import SplitRows
from streamnn.data.store import open_store
from streamnn.data.transforms import standardization
from streamnn.errors import StreamnnError
from streamnn.torch.images import Images


class StoreDataset(SplitRows, Dataset):
    """Rows of one split as ``(image, label)`` items (map-style), read in one go per batch.

    ``standardize``: with the store's ``/stats``; ``layout``, ``channels``, ``dtype``: as
    :class:`StoreBatches`; ``transform``: a callable applied to each image tensor.
    """

    label_dtype = np.int64

    def __init__(self, store: str | os.PathLike, split: str, *, standardize: bool = False, layout: str = "NCHW",
                 channels: str = "RGB", dtype: Any = "float32", transform: Any = None, reader: str = "auto") -> None:
        super().__init__(store, split, reader=reader)
        self.images = Images(self.image_shape, layout, channels, dtype, standardize)
        self._mean = self._inv = None
        if standardize:
            with open_store(self.path) as s:
                stats = s.stats()
            if stats is None:
                raise StreamnnError("standardize needs the store's /stats, which this store does not have", self.path)
            self._mean, self._inv = standardization(*stats)
        self.transform = transform

    def __getitems__(self, indices: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows, labels = self.read(indices)
        if self._mean is not None:
            rows -= self._mean
            rows *= self._inv
        images, targets = self.images(rows), torch.from_numpy(labels)
        items = [(images[j], targets[j]) for j in range(len(rows))]
        if self.transform is not None:
            items = [(self.transform(x), y) for x, y in items]
        return items

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]
