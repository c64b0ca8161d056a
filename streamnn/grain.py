"""JAX / Grain adapters: a store split as a random-access data source and as fixed-shape host batches.

Nothing here imports JAX or Grain: the protocols need neither (usage: docs/frameworks.md).

* :class:`StoreSource`: Grain's ``RandomAccessDataSource`` protocol (``__len__``,
  ``__getitem__`` of one record, picklable: only its settings travel, each process opens the
  store itself; ``close()`` closes this process's reader). ``process_index`` / ``process_count``
  shard it by process: process p holds the stored rows p, p + P, p + 2P, ... A record is
  ``{"image": (H, W, C), "label": int32}``.
* :class:`HostBatches`: the :class:`~streamnn.data.loader.Loader`'s global batches (its exact
  seeded orders, flips, shifts and erasures), process p of P taking its interleaved share, every batch
  padded to the same shape ``ceil(B / P)`` rows with a boolean ``mask`` (False on padded rows), so
  that ``jax.make_array_from_process_local_data`` gets the same shape on every process and a
  jitted step compiles once. ``get_state()`` / ``set_state()`` (a dict of str and int) resume
  exactly mid-epoch, also with another number of processes.

Conventions (JAX's usual ones): images NHWC, RGB (the store keeps BGR; ``channels="BGR"`` keeps
it), float32 in [0, 1] (augmented and standardized as the Loader does) or uint8; labels int32.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from streamnn.data.conventions import chosen, to_uint8
from streamnn.data.loader import Loader
from streamnn.data.rows import SplitRows
from streamnn.errors import StreamnnError

__all__ = ["StoreSource", "HostBatches"]


def _convert(rows: np.ndarray, shape: tuple[int, ...], channels: str, dtype: str) -> np.ndarray:
    """Normalized (b, D) BGR float32 rows -> a fresh (b, H, W, C) array in the chosen convention."""
    imgs = rows.reshape(len(rows), *shape)
    if channels == "RGB" and shape[2] == 3:
        imgs = imgs[..., ::-1]
    if dtype == "float32":
        return np.ascontiguousarray(imgs, np.float32)
    return to_uint8(np.array(imgs, np.float32)).astype(np.uint8)


class StoreSource(SplitRows):
    """Records of one split (process ``process_index``'s share of its rows), random access."""

    label_dtype = np.int32

    def __init__(self, store: str | os.PathLike, split: str, *, process_index: int = 0, process_count: int = 1,
                 channels: str = "RGB", dtype: Any = "float32", reader: str = "auto") -> None:
        self.channels, self.dtype = chosen(channels, dtype)
        if not 0 <= int(process_index) < int(process_count):
            raise StreamnnError(f"process_index {process_index} is not in 0..{int(process_count) - 1}")
        self.process_index, self.process_count = int(process_index), int(process_count)
        super().__init__(store, split, reader=reader)

    @property
    def split_rows(self) -> int:
        """The split's stored rows (all processes' records)."""
        return self.n_rows

    def __len__(self) -> int:
        return len(range(self.process_index, self.n_rows, self.process_count))

    def stored_row(self, index: int) -> int:
        """The stored row number of record ``index`` of this process's share."""
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"record {index} out of range 0..{len(self) - 1}")
        return self.process_index + i * self.process_count

    def __getitems__(self, indices: Any) -> list[dict[str, Any]]:
        rows, labels = self.read([self.stored_row(i) for i in indices])
        images = _convert(rows, self.image_shape, self.channels, self.dtype)
        return [{"image": images[j], "label": labels[j]} for j in range(len(images))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __repr__(self) -> str:
        return (f"StoreSource({self.path!r}, {self.split!r}, process {self.process_index} of "
                f"{self.process_count}, {len(self)} records)")


class HostBatches:
    """Fixed-shape host batches ``{"image", "label", "mask"}`` of this process, epoch after epoch.

    ``batch_size``: the global batch over all processes; the other settings (``shuffle``,
    ``seed``, ``augment``, ``standardize``, ``order``, ...) are :class:`Loader`'s. Iterating
    yields the rest of the current epoch; the next loop is the next epoch.
    """

    def __init__(self, store: str | os.PathLike, split: str, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1, channels: str = "RGB", dtype: Any = "float32", drop_last: bool = False,
                 **loader_kwargs: Any) -> None:
        self.channels, self.dtype = chosen(channels, dtype, bool(loader_kwargs.get("standardize")))
        self.loader = Loader(store, split, batch_size, rank=process_index, world_size=process_count,
                             drop_last=drop_last, reuse_buffers=True, **loader_kwargs)
        self.rows = self.loader.local_batch_size  # every batch's rows (padded)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        L = self.loader
        shape, n = L.image_shape, self.rows
        for X, Y in L:
            b = X.shape[1]
            image = np.zeros((n, *shape), self.dtype)
            image[:b] = _convert(X.T, shape, self.channels, self.dtype)
            label = np.zeros(n, np.int32)
            label[:b] = Y.reshape(-1)
            mask = np.zeros(n, bool)
            mask[:b] = True
            yield {"image": image, "label": label, "mask": mask}

    def get_state(self) -> dict[str, str | int]:
        """The stream's position (the Loader's state: str and int values, JSON-able)."""
        return self.loader.state_dict()

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`get_state` (saved with any number of processes)."""
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()
