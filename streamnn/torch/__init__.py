"""PyTorch adapters: a store split as a torch dataset (usage and guarantees: docs/frameworks.md).

Only this package imports torch (the optional extra ``streamnn[torch]``); the core never does.

* :class:`StoreBatches`: an ``IterableDataset`` of whole batches for ``DataLoader(ds,
  batch_size=None, num_workers=N)``, or better :meth:`StoreBatches.dataloader`, which also tracks
  the position for :meth:`~StoreBatches.state_dict` and hands batches over cheaply. The batches
  are the :class:`~streamnn.data.loader.Loader`'s: global batch k of an epoch is the same rows,
  flips, shifts and erased rectangles as in a NumPy run with the same seed; rank r of W holds its interleaved share
  ``batch[r::W]`` (:mod:`streamnn.data.order`), and DataLoader worker w of N makes the rank's
  batches k = position + w, position + w + N, ..., which DataLoader's round robin hands out in
  order k = position, position + 1, ... So every row comes once per epoch, nothing is repeated,
  every rank has the same number of batches whatever N, and the state is a position in global
  batches: it resumes with any number of workers or ranks. The epoch and position live in a
  small shared-memory block, so persistent workers see ``set_epoch`` and resumes.
* Hand-over: :meth:`StoreBatches.dataloader` with workers passes batches through a pool of
  shared-memory slots made once (:mod:`streamnn.torch.ring`): the tensors you get are the slots
  themselves, reused only once nothing references them; not a fresh shared tensor per batch
  (what a plain DataLoader does, 5-10x slower on 2 cores). Worker w of N then makes groups of G
  consecutive batches (from position + wG, every NG), one DataLoader item each, in order.
  Float32 batches of a uint8 store travel as the stored bytes (gathered, augmented, turned,
  erased: erasing sets 0, which scaling keeps) and the main process scales them into its own
  reused buffers (:meth:`StoreBatches._scaled`): a quarter of the shared memory written and read.
* :class:`StoreDataset` (:mod:`streamnn.torch.dataset`): map-style (``__len__``,
  ``__getitem__``, the batched ``__getitems__`` that DataLoader calls, reading a batch's rows in
  one call of the store's reader), for a ``DistributedSampler`` of your own.

Conventions (PyTorch's, not streamnn's): images ``(B, C, H, W)`` (``layout="NCHW"``; "NHWC",
or "channels_last": NCHW shape in NHWC memory, no transposing copy), RGB (the store keeps BGR,
as OpenCV decodes: ``channels="BGR"`` keeps it), float32 in [0, 1] (``stored * scale``, then
augmented and standardized as the Loader does) or uint8 (``round(255 x)``), labels int64 class
indices. Each process opens the store itself: pickling a dataset (what DataLoader does for its
workers) keeps only its settings, its position and the shared blocks.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from streamnn.data.conventions import CHANNELS, choice, to_uint8
from streamnn.data.epoch import Takes
from streamnn.data.loader import Loader
from streamnn.data.readers.base import normalize_into
from streamnn.data.store import open_store
from streamnn.data.transforms import DEFAULT_SHIFT, erase_images, flip_images, shift_images
from streamnn.errors import StreamnnError
from streamnn.torch.dataset import StoreDataset
from streamnn.torch.images import LAYOUTS, Images, empty
from streamnn.torch.ring import Counted, Ring, Slots

__all__ = ["StoreBatches", "StoreDataset", "LAYOUTS", "CHANNELS", "LAST", "IGNORE_INDEX"]

#: The last batch's policy: "keep" (uneven shares, a rank's may be empty), "drop" (drop_last),
#: "pad" (every share padded to the full local batch; padded rows are zeros labelled IGNORE_INDEX).
LAST = ("keep", "drop", "pad")
#: The label of padded rows (``last="pad"``): ``torch.nn.CrossEntropyLoss``'s default ignore_index.
IGNORE_INDEX = -100
#: Image buffers reused by a process that iterates in place (:class:`~streamnn.torch.ring.Slots`).
IN_PLACE_SLOTS = 4
_ORDER_SETTINGS = ("seed", "order", "augment", "shuffle", "drop_last", "block_rows", "window_blocks")


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's when it is initialized, else (0, 1)."""
    dist = torch.distributed
    up = dist.is_available() and dist.is_initialized()
    return (dist.get_rank() if up else 0) if rank is None else rank, \
        (dist.get_world_size() if up else 1) if world_size is None else world_size


def _failing(error: Exception) -> Iterator[Any]:
    """Iterating it raises ``error`` (in a worker: where DataLoader hands the error on to the caller)."""
    raise error
    yield  # a generator function


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
        self.last = choice(last, LAST, "last-batch policy")
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
        self.images = Images(L.image_shape, layout, channels, dtype, standardize)
        self.class_names, self.rank, self.world_size = L.class_names, L.rank, L.world_size
        with open_store(self._where[0]) as s:
            stored, self._scale32 = s.dtype, np.float32(s.scale)
        v = np.arange(256, dtype=np.uint8)
        exact = np.array_equal(to_uint8(np.multiply(v, self._scale32, dtype=np.float32)), v)
        #: Batches are made from the stored bytes (uint8 store, its scale exact, not standardized).
        self._raw = stored == "uint8" and exact and not standardize
        #: Shared with the workers: epoch, position, settings version (load_state_dict changes it).
        self._control = torch.zeros(3, dtype=torch.int64).share_memory_()
        self._ctl = self._control.numpy()  # the same memory, read and written at NumPy's cost (not torch's 3 us)
        self._settings = 0
        self._ring: Ring | None = None
        self._pool: Slots | None = None
        self._scratch: dict[str, np.ndarray] = {}
        self._counting = False  # dataloader() counts the batches itself
        self._fresh_workers = False  # dataloader()'s workers start a new interpreter (spawn, forkserver)
        #: In a DataLoader worker: (epoch, last batch made, workers), and where to resume (epoch, batch).
        self._made: tuple[int, int, int] | None = None
        self._resume: tuple[int, int] | None = None

    # -- the engine: a Loader of this process ------------------------------------------------------
    def _engine(self) -> Loader:
        if self._loader is None or self._pid != os.getpid():
            L = Loader(*self._where, **self._kwargs)
            if self._state is not None:
                L.load_state_dict(self._state)
            self._loader, self._pid, self._scratch = L, os.getpid(), {}
        return self._loader

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_loader"], state["_scratch"], state["_pool"] = None, {}, None  # the worker opens the store itself
        del state["_ctl"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _ctl=state["_control"].numpy())

    def __len__(self) -> int:
        """Batches per epoch on every rank (global batches; the same whatever the number of workers)."""
        return len(self._engine())

    @property
    def local_batch_size(self) -> int:
        """Rows of this rank's share of a full global batch (every batch's rows with ``last="pad"``)."""
        return self._engine().local_batch_size

    #: The stream's position: the epoch, and the global batches of it handed out (shared memory).
    epoch = property(lambda self: int(self._ctl[0]), lambda self, v: self._ctl.__setitem__(0, int(v)))
    position = property(lambda self: int(self._ctl[1]), lambda self, v: self._ctl.__setitem__(1, int(v)))

    def set_epoch(self, epoch: int) -> None:
        """Iterate ``epoch`` next, from its start (unless the stream is already in that epoch)."""
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    # -- iteration -------------------------------------------------------------------------------
    def _start(self, move: bool = True) -> tuple[int, int]:
        """Where the next loop starts: the position, or the next epoch's start after a finished one."""
        nb, epoch, position = len(self), self.epoch, self.position
        if nb and position >= nb:
            epoch, position = epoch + 1, 0
            if move:
                self.epoch, self.position = epoch, position
        return epoch, position

    def shard(self, worker: int, num_workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches worker ``worker`` of ``num_workers`` makes for the rest of the current epoch (or
        from where a StatefulDataLoader restored this worker)."""
        L = self._engine()
        epoch, start = self._start(move=False)
        epoch, first = self._resume if self._resume is not None else (epoch, start + worker)
        self._resume = None
        L.takes = Takes(first, 1, num_workers, again=worker)
        for k in range(first, len(L), num_workers):
            batch = self.batch(epoch, k)
            self._made = (epoch, k, num_workers)  # this worker's place (its state_dict)
            yield batch

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        if info is None:
            return self._here()
        if self._settings != int(self._ctl[2]):  # raised on the first batch: DataLoader passes it on
            return _failing(StreamnnError("load_state_dict changed the stream's order settings after the "
                                          "DataLoader's workers started: make a new DataLoader (dataloader() "
                                          "does it by itself)"))
        if self._ring is None:
            return self.shard(info.id, info.num_workers)
        if self._fresh_workers and cv2.getNumThreads() != 1:  # spawned: OpenCV's pool never ran here
            cv2.setNumThreads(1)  # (forked workers inherit one thread: dataloader() sets it around the fork)
        return self._to_ring(info.id, info.num_workers, *(int(v) for v in self._ring.loop))

    def _here(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, _ = self._start()
        for batch in self.shard(0, 1):
            if not self._counting:
                self.position += 1
            yield batch
        if not self._counting and self.epoch == epoch and self.position >= len(self):
            self.epoch, self.position = epoch + 1, 0

    def _to_ring(self, worker: int, workers: int, loop: int, epoch: int, start: int) -> Iterator[list[Any]]:
        """Worker ``worker``'s groups of the rest of ``epoch`` (:class:`~streamnn.torch.ring.Ring`):
        each batch into a free slot of the ring, as (worker, slot, rows, loop), or as fresh tensors
        when every slot is in use."""
        ring, L = self._ring, self._engine()
        assert ring is not None
        g, nb = ring.group, len(L)
        L.takes = Takes(start + worker * g, g, workers * g, again=worker * g)
        for first in range(start + worker * g, nb, workers * g):
            group: list[Any] = []
            for k in range(first, min(first + g, nb)):
                slot = ring.claim(worker)
                if slot is None:
                    group.append(self.batch(epoch, k))
                else:
                    _, total = self._produce(epoch, k, ring.images[worker, slot], ring.labels[worker, slot])
                    group.append((worker, slot, total, loop))
            yield group

    def _stage(self, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """This process's scratch buffer ``name``, grown on demand."""
        n = math.prod(shape)
        buf = self._scratch.get(name)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = self._scratch[name] = np.empty(n, dtype)
        return buf[:n].reshape(shape)

    def _produce(self, epoch: int, k: int, images: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
        """This rank's share of global batch ``k`` of ``epoch`` into ``images`` (b, *memory) and
        ``labels``, padded rows zero / IGNORE_INDEX; returns (rows, rows with padding)."""
        L = self._engine()
        rows = L.batch_rows(epoch, k)
        b = len(rows)
        total = L.local_batch_size if self.last == "pad" else b
        labels[:b] = L._labels[rows]
        labels[b:total] = IGNORE_INDEX
        images[b:total] = 0
        maker = L._batches()
        array = getattr(maker.reader, "array", None) if self._raw and maker.reader.mode == "memmap" else None
        if array is not None:  # the stored bytes, gathered and augmented as they are
            src = self._stage("gather", (b, *L.image_shape), "uint8")
            maker.reader.check()  # as the reader does: a truncated store is an error, not a SIGBUS
            np.take(array, rows, axis=0, out=src.reshape(b, L.n_features))
            maker.reader.check(path=False)
            aug, gb, where = L._augment, L.global_batch_size(k), (L.rank, L.world_size)
            if aug.flip:
                flip_images(src, aug.flips(L.seed, epoch, k, gb, *where))
            if aug.shift:
                shift_images(src, aug.shifts(L.seed, epoch, k, gb, *where), aug.shift, aug.padding)
        else:  # the Loader's own batch (any reader), back to the stored bytes if they travel
            X, _ = maker.produce(epoch, k, self._stage("gather", (b, L.n_features), "float32"))
            src = X.T.reshape(b, *L.image_shape)
            if images.dtype == np.uint8:
                src = to_uint8(src)  # (a uint8 store's own bytes)
        self.images.arrange(src, images[:b], self._scale32, self._stage("order", src.shape, src.dtype.str))
        if array is not None and L._augment.erase:  # (the Loader's batches are erased already)
            erase_images(images[:b], L._augment.erasures(L.seed, epoch, k, L.global_batch_size(k), L.image_shape,
                                                         L.rank, L.world_size), self.images.layout == "NCHW")
        return b, total

    def batch(self, epoch: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch ``k`` of ``epoch``: (images, int64 labels)."""
        L = self._engine()
        total = L.local_batch_size if self.last == "pad" else len(L.batch_rows(epoch, k))
        kept = self._slots().take(total) if get_worker_info() is None else None
        out = empty((total, *self.images.memory), getattr(torch, self.images.dtype)) if kept is None else None
        labels = empty((total,), torch.int64)
        self._produce(epoch, k, out.numpy() if kept is None else kept, labels.numpy())
        return self.images.view(torch.from_numpy(kept) if kept is not None else out), labels

    @property
    def _travels(self) -> str:
        """The dtype of the images workers hand over: the stored bytes when the batches are made of
        them (the main process scales them, :meth:`_scaled`), else the images' own."""
        return "uint8" if self._raw else self.images.dtype

    def _scaled(self, raw: np.ndarray) -> torch.Tensor:
        """Images of stored bytes ``raw`` (b, *memory) as the batch's float32 tensor, into one of this
        process's buffers (:class:`Slots`): the Loader's arithmetic, ``float32(byte) * scale``.
        (Erasing, the last step of a batch made of bytes, sets bytes to 0: the same as after.)"""
        out = self._slots().take(len(raw))
        out = np.empty(raw.shape, np.float32) if out is None else out
        normalize_into(raw, out, self._scale32)
        return self.images.view(torch.from_numpy(out))

    def _slots(self) -> Slots:
        """This process's :class:`Slots` (made on first use; a forked child makes its own)."""
        if self._pool is None or self._pool.pid != os.getpid():
            self._pool = Slots(IN_PLACE_SLOTS, self.local_batch_size, self.images.memory, self.images.dtype)
        return self._pool

    def dataloader(self, **kwargs: Any) -> Counted:
        """``DataLoader(self, batch_size=None, **kwargs)`` that counts the batches the caller takes, so
        that :meth:`state_dict` is exact, moves to the next epoch when one ends and, with workers,
        hands batches over through a shared ring (``persistent_workers`` on unless given)."""
        if kwargs.get("in_order") is False:
            raise StreamnnError("in_order=False would hand batches out of order: the position would not "
                                "say which batches were taken")
        return Counted(self, kwargs)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, str | int]:
        """The Loader's state (str and int values) at this stream's epoch and position. In a DataLoader
        worker (torchdata's StatefulDataLoader asks each worker), the position after the last batch
        the worker made, and ``worker_next``, the next batch it makes."""
        L = self._engine()
        made = self._made if get_worker_info() is not None else None
        if made is None:
            L.epoch, L.position = self.epoch, min(self.position, len(L))
            return L.state_dict()
        epoch, k, step = made
        L.epoch, L.position = epoch, k + 1
        return {**L.state_dict(), "worker_next": k + step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream saved by :meth:`state_dict` (or by a Loader, or a StatefulDataLoader's
        ``state_dict()``: the furthest of its workers' states), with any number of workers or
        ranks; the saved order-defining settings are adopted (nothing changes on error)."""
        info = get_worker_info()
        state = _own_state(state) if info is None else state
        L = self._engine()
        before = [getattr(L, k) for k in _ORDER_SETTINGS]
        L.load_state_dict(state)
        self._state = dict(state)
        self._kwargs["drop_last"] = L.drop_last
        if L.drop_last:
            self.last = "drop"
        elif self.last == "drop":
            self.last = "keep"
        if info is not None:  # a StatefulDataLoader restores this worker: its own place, nothing shared
            self._resume = (int(state["epoch"]), int(state.get("worker_next", L.position + info.id)))
            return
        if before != [getattr(L, k) for k in _ORDER_SETTINGS]:  # workers made before cannot go on
            self._settings = int(self._ctl[2]) + 1
            self._ctl[2] = self._settings
        self.epoch, self.position = L.epoch, L.position


def _own_state(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The StoreBatches state in a torchdata StatefulDataLoader's ``state_dict()`` (with workers: the
    furthest worker's, plus the batches taken since the last snapshot), else ``state`` itself."""
    snapshot = state.get("_snapshot")
    if isinstance(snapshot, Mapping):
        found = [w.get("dataset_state") for w in snapshot.get("_worker_snapshots", {}).values()]
        found = [s for s in found if isinstance(s, Mapping) and "position" in s]
        if not found:
            raise StreamnnError("the StatefulDataLoader state holds no StoreBatches state")
        best = dict(max(found, key=lambda s: (int(s["epoch"]), int(s["position"]))))
        best["position"] = int(best["position"]) + int(state.get("_steps_since_snapshot", 0))
        best.pop("samples", None)
        best.pop("worker_next", None)
        return best
    inner = state.get("dataset_state")
    return inner if isinstance(inner, Mapping) and "position" in inner else state
