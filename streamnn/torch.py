"""PyTorch adapters: a store split as a torch dataset (usage and guarantees: docs/frameworks.md).

Only this module imports torch (the optional extra ``streamnn[torch]``); the core never does.

* :class:`StoreBatches`: an ``IterableDataset`` of whole batches for ``DataLoader(ds,
  batch_size=None, num_workers=N)`` (or :meth:`StoreBatches.dataloader`, which also tracks the
  position for :meth:`~StoreBatches.state_dict`). The batches are the
  :class:`~streamnn.data.loader.Loader`'s: global batch k of an epoch is the same rows, flips and
  shifts as in a NumPy run with the same seed; rank r of W holds its interleaved share
  ``batch[r::W]`` (:mod:`streamnn.data.order`), and DataLoader worker w of N makes the rank's
  batches k = position + w, position + w + N, ..., which DataLoader's round robin hands out in
  order k = position, position + 1, ... So every row comes once per epoch, nothing is repeated,
  every rank has the same number of batches whatever N, and the state is a position in global
  batches: it resumes with any number of workers or ranks.
* :class:`StoreDataset`: map-style (``__len__``, ``__getitem__``, the batched ``__getitems__``
  that DataLoader calls, reading a batch's rows in one call of the store's reader), for a
  ``DistributedSampler`` of your own.

Conventions (PyTorch's, not streamnn's): images ``(B, C, H, W)`` (``layout="NCHW"``; "NHWC",
or "channels_last": NCHW shape in NHWC memory, no transposing copy), RGB (the store keeps BGR,
as OpenCV decodes: ``channels="BGR"`` keeps it), float32 in [0, 1] (``stored * scale``, then
augmented and standardized as the Loader does) or uint8 (``round(255 x)``), labels int64 class
indices. Each process opens the store itself: pickling a dataset (what DataLoader does for its
workers) keeps only its settings and position.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from streamnn.data.loader import Loader
from streamnn.data.readers import open_rows
from streamnn.data.store import open_store
from streamnn.data.transforms import DEFAULT_SHIFT, standardization
from streamnn.errors import StreamnnError

__all__ = ["StoreBatches", "StoreDataset", "LAYOUTS", "CHANNELS", "LAST", "IGNORE_INDEX"]

LAYOUTS = ("NCHW", "NHWC", "channels_last")
CHANNELS = ("RGB", "BGR")
#: The last batch's policy: "keep" (uneven shares, a rank's may be empty), "drop" (drop_last),
#: "pad" (every share padded to the full local batch; padded rows are zeros labelled IGNORE_INDEX).
LAST = ("keep", "drop", "pad")
#: The label of padded rows (``last="pad"``): ``torch.nn.CrossEntropyLoss``'s default ignore_index.
IGNORE_INDEX = -100


def _choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise StreamnnError(f"unknown {name} {value!r} (choose {', '.join(choices)})")
    return str(value)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor; in a DataLoader worker in shared memory at once (else sending it copies it there)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(max(size, 1)), 0, shape)


class _Images:
    """Normalized (b, D) BGR float32 rows -> an image tensor in the chosen convention (one copy)."""

    def __init__(self, image_shape: tuple[int, ...], layout: str, channels: str, dtype: Any) -> None:
        self.shape = tuple(int(s) for s in image_shape)
        self.layout = _choice(layout, LAYOUTS, "layout")
        self.channels = _choice(channels, CHANNELS, "channels")
        name = str(dtype).removeprefix("torch.")
        if name not in ("float32", "uint8"):
            raise StreamnnError(f"dtype must be float32 or uint8, got {dtype!r}")
        self.dtype = name

    def __call__(self, rows: np.ndarray, total: int | None = None) -> torch.Tensor:
        h, w, c = self.shape
        b = len(rows)
        total = b if total is None else total
        imgs = rows.reshape(b, h, w, c)
        if self.channels == "RGB" and c == 3:
            imgs = imgs[..., ::-1]
        nchw = self.layout == "NCHW"
        out = _empty((total, c, h, w) if nchw else (total, h, w, c), getattr(torch, self.dtype))
        src = imgs.transpose(0, 3, 1, 2) if nchw else imgs
        full = out.numpy()
        full[b:] = 0  # padded rows
        dst = full[:b]
        if self.dtype == "float32":
            np.copyto(dst, src)
        else:
            tmp = np.multiply(src, np.float32(255))
            np.clip(np.rint(tmp, out=tmp), 0, 255, out=tmp)
            np.copyto(dst, tmp, casting="unsafe")
        return out.permute(0, 3, 1, 2) if self.layout == "channels_last" else out


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's when it is initialized, else (0, 1)."""
    dist = torch.distributed
    up = dist.is_available() and dist.is_initialized()
    return (dist.get_rank() if up else 0) if rank is None else rank, \
        (dist.get_world_size() if up else 1) if world_size is None else world_size


class StoreBatches(IterableDataset):
    """Batches ``(images, labels)`` of one split of a store, for ``DataLoader(self, batch_size=None)``.

    ``batch_size`` is the global batch (over all ranks), as for the Loader; ``rank`` /
    ``world_size`` default to ``torch.distributed``'s (when initialized). ``shuffle``, ``seed``,
    ``order``, ``augment``, ``shift``, ``shift_padding``, ``standardize``, ``subset``, ``reader``:
    as :class:`~streamnn.data.loader.Loader`. ``last``: see :data:`LAST`. Call :meth:`set_epoch`
    before each epoch (or iterate :meth:`dataloader`, which moves to the next epoch by itself).
    """

    def __init__(self, store: str | os.PathLike, split: str, batch_size: int = 64, *, shuffle: bool = True,
                 seed: int = 0, last: str = "keep", order: str = "exact", augment: str | None = None,
                 shift: int = DEFAULT_SHIFT, shift_padding: str = "reflect", standardize: bool = False,
                 layout: str = "NCHW", channels: str = "RGB", dtype: Any = "float32", rank: int | None = None,
                 world_size: int | None = None, subset: Any = None, reader: str = "auto") -> None:
        super().__init__()
        self.last = _choice(last, LAST, "last-batch policy")
        rank, world_size = _rank_world(rank, world_size)
        self._kwargs = dict(batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=self.last == "drop",
                            order=order, augment=augment, shift=shift, shift_padding=shift_padding,
                            standardize=standardize, rank=rank, world_size=world_size, subset=subset,
                            reader=reader, prefetch=0)
        self._where = (os.fspath(store), str(split))
        self._state: dict[str, Any] | None = None
        self._loader: Loader | None = None
        self._pid = 0
        L = self._engine()  # validates the store and the settings now, in the caller's process
        self.images = _Images(L.image_shape, layout, channels, dtype)
        if standardize and self.images.dtype == "uint8":
            raise StreamnnError("standardized images are not uint8: use dtype float32 with standardize")
        self.class_names, self.rank, self.world_size = L.class_names, L.rank, L.world_size
        #: The stream's position: the epoch, and the global batches of it handed out.
        self.epoch, self.position = 0, 0
        self._counting = False  # dataloader() counts the batches itself

    # -- the engine: a Loader of this process ------------------------------------------------------
    def _engine(self) -> Loader:
        if self._loader is None or self._pid != os.getpid():
            L = Loader(*self._where, **self._kwargs)
            if self._state is not None:
                L.load_state_dict(self._state)
            self._loader, self._pid = L, os.getpid()
        return self._loader

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_loader"] = None  # settings and position only: the worker opens the store itself
        return state

    def __len__(self) -> int:
        """Batches per epoch on every rank (global batches; the same whatever the number of workers)."""
        return len(self._engine())

    @property
    def local_batch_size(self) -> int:
        """Rows of this rank's share of a full global batch (every batch's rows with ``last="pad"``)."""
        return self._engine().local_batch_size

    def set_epoch(self, epoch: int) -> None:
        """Iterate ``epoch`` next, from its start (unless the stream is already in that epoch)."""
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    # -- iteration -------------------------------------------------------------------------------
    def _start(self) -> tuple[int, int]:
        nb = len(self)
        if nb and self.position >= nb:
            self.epoch, self.position = self.epoch + 1, 0
        return self.epoch, self.position

    def shard(self, worker: int, num_workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches worker ``worker`` of ``num_workers`` makes for the rest of the current epoch."""
        L = self._engine()
        epoch, start = self._start()
        L.batch_step = num_workers
        for k in range(start + worker, len(L), num_workers):
            yield self.batch(epoch, k)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        if info is not None:
            yield from self.shard(info.id, info.num_workers)
            return
        epoch, _ = self._start()
        for batch in self.shard(0, 1):
            if not self._counting:
                self.position += 1
            yield batch
        if not self._counting and self.epoch == epoch and self.position >= len(self):
            self.epoch, self.position = epoch + 1, 0

    def batch(self, epoch: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch ``k`` of ``epoch``: (images, int64 labels)."""
        L = self._engine()
        rows = L.batch_rows(epoch, k)
        b = len(rows)
        total = L.local_batch_size if self.last == "pad" else b
        labels = np.full(total, IGNORE_INDEX, np.int64)
        labels[:b] = L._labels[rows]
        im = self.images
        if im.dtype == "float32" and im.layout != "NCHW":  # the tensor is the row buffer: made in place
            out = _empty((total, *L.image_shape), torch.float32)
            buf = out.numpy().reshape(total, L.n_features)
            buf[b:] = 0
            L._batches().produce(epoch, k, buf)
            if im.channels == "RGB" and L.image_shape[2] == 3:
                px = out.numpy()[:b]
                blue = px[..., 0].copy()
                px[..., 0] = px[..., 2]
                px[..., 2] = blue
            return (out.permute(0, 3, 1, 2) if im.layout == "channels_last" else out), torch.from_numpy(labels)
        X, _ = L._batches().get(epoch, k)  # (D, b) view of the loader's buffer: copied below
        return im(X.T, total), torch.from_numpy(labels)

    def dataloader(self, **kwargs: Any) -> _Counted:
        """``DataLoader(self, batch_size=None, **kwargs)`` that counts the batches the caller takes, so
        that :meth:`state_dict` is exact, and moves to the next epoch when one ends."""
        if kwargs.get("persistent_workers"):
            raise StreamnnError("persistent_workers would keep each worker's copy of the epoch and position: "
                                "leave it off (workers open the store in a fraction of a second)")
        return _Counted(self, DataLoader(self, batch_size=None, **kwargs))

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, str | int]:
        """The Loader's state (str and int values) at this stream's epoch and position."""
        L = self._engine()
        L.epoch, L.position = self.epoch, min(self.position, len(L))
        return L.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream saved by :meth:`state_dict` (or by a Loader), with any number of
        workers or ranks; the saved order-defining settings are adopted (nothing changes on error)."""
        L = self._engine()
        L.load_state_dict(state)
        self._state = dict(state)
        self._kwargs["drop_last"] = L.drop_last
        if L.drop_last:
            self.last = "drop"
        elif self.last == "drop":
            self.last = "keep"
        self.epoch, self.position = L.epoch, L.position


class _Counted:
    """A DataLoader over a :class:`StoreBatches` that advances its position batch by batch."""

    def __init__(self, batches: StoreBatches, loader: DataLoader) -> None:
        self.batches, self.loader = batches, loader

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        ds = self.batches
        epoch, _ = ds._start()
        ds._counting = True
        try:
            for batch in self.loader:  # workers get a copy of ds at this epoch and position
                ds.position += 1
                yield batch
        finally:
            ds._counting = False
        if ds.epoch == epoch and ds.position >= len(ds):
            ds.epoch, ds.position = epoch + 1, 0


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
        self.images = _Images(shape, layout, channels, dtype)
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
