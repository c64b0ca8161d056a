"""Handing a :class:`~streamnn.torch.StoreBatches`' batches from DataLoader workers to the main
process through a pool of slots in shared memory (:meth:`StoreBatches.dataloader`).

A plain DataLoader sends each batch as a fresh shared-memory tensor: the worker makes a new
shared segment, its pages are faulted in on both sides, and its descriptor is passed over a
socket for each of the images and the labels. Measured on 2 busy cores, that caps 64 float32
64x64x3 images at 7,000-11,000 samples/s, whatever the data. Here each worker has ``slots`` slots
made once, before the workers start: it writes a batch into a free slot and sends only integers
(worker, slot, rows, loop); the main process hands out the slot itself as the image tensor (no
copy; the labels are copied) and frees the slot when the last reference to it is gone (a weak
reference on the array the tensor holds), or, when the slots hold a uint8 store's bytes for
float32 batches, scales them into a buffer of its own and frees the slot at once. So a batch is never overwritten while anything
references it, like a fresh tensor. A worker that finds no free slot (the caller keeps many
batches) sends that batch as fresh tensors instead: slower, never blocked.

Batches travel in groups: DataLoader costs about 0.1 ms of the main process's CPU per item
(index and result queues, pickled messages, a feeder thread each way), as much as making a third
of a batch of 64 64x64x3 images. So each item is a group of G consecutive batches (:data:`GROUP_BYTES`):
worker w of N makes batches start + wG ... start + wG + G - 1, then the same N x G further on, and
DataLoader's round robin over the workers hands the groups out in order.

Slot states live in the pool's head, written by one side at a time: the worker marks a free
slot busy and fills it; the main process marks it free once the batch it lent is gone, and at
the start of each loop frees every slot it does not lend (batches of an abandoned loop still in
DataLoader's queues are discarded, their slots with them). The head also holds the loop's
number, epoch and first batch, which workers read when they start the loop.
"""
from __future__ import annotations

import contextlib
import copy
import math
import multiprocessing
import os
import weakref
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from streamnn.torch.images import shared

FREE, BUSY = 0, 1
#: Batches per DataLoader item: as many as fit in GROUP_BYTES of images, at most MAX_GROUP. Each
#: item costs DataLoader about 0.1 ms of the main process's CPU (its queues, pickling, a feeder
#: thread), a third of making a batch of 64 64x64x3 images.
GROUP_BYTES, MAX_GROUP = 16 << 20, 8


class Ring:
    """``slots`` batch slots for each of ``workers`` DataLoader workers in shared memory: ``rows``
    images of shape ``memory`` and dtype ``dtype``, and their int64 labels. Workers hand batches
    over in groups of ``group`` consecutive ones (one DataLoader item each)."""

    def __init__(self, workers: int, slots: int, rows: int, memory: tuple[int, ...], dtype: str,
                 group: int = 1) -> None:
        self.workers, self.slots, self.rows, self.memory, self.dtype = workers, slots, rows, memory, dtype
        self.group = group
        self._image = rows * int(np.prod(memory)) * np.dtype(dtype).itemsize
        self._slot = -(-(self._image + 8 * rows) // 64) * 64
        self._head = -(-8 * (3 + workers * slots) // 64) * 64
        self.storage = shared(self._head + workers * slots * self._slot)  # a uint8 tensor
        self.lent: set[tuple[int, int]] = set()  # (worker, slot) whose batch the main process handed out
        self._views()

    def _views(self) -> None:
        buf = self.storage.numpy()
        head = buf[:self._head].view(np.int64)
        self.loop = head[:3]  # the loop's number, epoch, first batch
        self.state = head[3:3 + self.workers * self.slots].reshape(self.workers, self.slots)
        body = buf[self._head:].reshape(self.workers, self.slots, self._slot)
        self.images = body[..., :self._image].view(self.dtype).reshape(self.workers, self.slots, self.rows,
                                                                          *self.memory)
        self.labels = body[..., self._image:self._image + 8 * self.rows].view(np.int64)

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker: the storage travels as a descriptor
        return {k: v for k, v in self.__dict__.items() if k not in ("loop", "state", "images", "labels", "lent")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, lent=set())
        self._views()

    def begin(self, epoch: int, start: int) -> None:
        """A new loop from batch ``start`` of ``epoch`` (what workers read as they start it: the live
        position moves on as batches are taken, maybe before a worker starts)."""
        self.loop[:] = self.loop[0] + 1, epoch, start
        keep = np.zeros(self.state.shape, bool)
        for w, s in set(self.lent):
            keep[w, s] = True
        self.state[~keep] = FREE

    def claim(self, worker: int) -> int | None:
        """A free slot of ``worker``, now busy (None: all are in use)."""
        states = self.state[worker]
        for slot, state in enumerate(states.tolist()):
            if state == FREE:
                states[slot] = BUSY
                return slot
        return None

    def lend(self, worker: int, slot: int, rows: int) -> torch.Tensor:
        """The images of a filled slot as a tensor over the slot; the slot is freed once it and every
        view of it are gone."""
        array = self.images[worker, slot, :rows]
        self.lent.add((worker, slot))
        weakref.finalize(array, self._free, worker, slot)
        return torch.from_numpy(array)

    def _free(self, worker: int, slot: int) -> None:
        self.lent.discard((worker, slot))
        self.state[worker, slot] = FREE


class Slots:
    """Image buffers of the process that iterates in place (no workers): a batch is made into a
    free one and handed out as a tensor over it, and the buffer is free again once that tensor and
    every view of it are gone (as :meth:`Ring.lend`), so that no batch is overwritten while anything
    references it and no batch pays for new memory (a fresh 3 MB tensor per batch costs its page
    faults: a third of the batch's time here). Private memory: a forked child makes its own."""

    def __init__(self, count: int, rows: int, memory: tuple[int, ...], dtype: str) -> None:
        self.pid = os.getpid()
        self.buffers = [np.empty((rows, *memory), dtype) for _ in range(count)]
        self.busy = [False] * count

    def take(self, rows: int) -> np.ndarray | None:
        """A free buffer's first ``rows`` images, busy until the array (or a tensor over it) is gone;
        None when every buffer is in use (the caller keeps them)."""
        for i, busy in enumerate(self.busy):
            if not busy:
                self.busy[i] = True
                array = self.buffers[i][:rows]
                weakref.finalize(array, self.busy.__setitem__, i, False)
                return array
        return None


class Counted:
    """A DataLoader over a StoreBatches that advances its position batch by batch; with workers, over
    a copy of it whose workers fill a :class:`Ring` (remade when load_state_dict changed the order
    settings, as persistent workers keep the ones they started with)."""

    def __init__(self, batches: Any, kwargs: dict[str, Any]) -> None:
        self.batches, self.kwargs = batches, dict(kwargs)
        self.workers = int(kwargs.get("num_workers", 0))
        self.pin = bool(kwargs.get("pin_memory")) and self.workers > 0 and torch.accelerator.is_available()
        self.loader: DataLoader | None = None
        self.ring: Ring | None = None
        self._settings = -1

    def __len__(self) -> int:
        return len(self.batches)

    def _dataloader(self) -> DataLoader:
        ds = self.batches
        if self.loader is None or self._settings != ds._settings:
            kw = dict(self.kwargs)
            if self.workers > 0:
                kw["pin_memory"] = False  # the main process pins what it hands out
                kw.setdefault("collate_fn", as_is)  # slot numbers or tensors: nothing to convert
                kw.setdefault("persistent_workers", True)
                clone = copy_of(ds)
                clone._fresh_workers = start_method(kw.get("multiprocessing_context")) != "fork"
                memory = ds.local_batch_size * math.prod(ds.images.memory) * np.dtype(ds._travels).itemsize
                group = max(1, min(MAX_GROUP, GROUP_BYTES // max(memory, 1)))
                slots = (int(kw.get("prefetch_factor") or 2) + 1) * group + 3  # in flight, and held by the caller
                clone._ring = self.ring = Ring(self.workers, slots, ds.local_batch_size, ds.images.memory,
                                               ds._travels, group)
                ds = clone
            self.loader, self._settings = DataLoader(ds, batch_size=None, **kw), self.batches._settings
        return self.loader

    def take(self, item: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of a worker's item: its slot lent as the image tensor, or its fresh tensors."""
        ring = self.ring
        assert ring is not None
        if len(item) == 2:
            images, labels = item
        else:
            worker, slot, rows, _ = (int(v) for v in item)
            labels = torch.from_numpy(ring.labels[worker, slot, :rows].copy())
            if ring.dtype == self.batches.images.dtype:
                images = self.batches.images.view(ring.lend(worker, slot, rows))
            else:  # stored bytes, scaled here into a buffer of this process: the slot is free at once
                images = self.batches._scaled(ring.images[worker, slot, :rows])
                ring.state[worker, slot] = FREE
        if self.pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        return images, labels

    def __iter__(self) -> Any:
        ds, loader = self.batches, self._dataloader()
        epoch, start = ds._start()
        ring = self.ring if self.workers > 0 else None
        if ring is not None:
            ring.begin(epoch, start)
        ds._counting = True
        try:
            with one_opencv_thread() if ring is not None else contextlib.nullcontext():  # forked workers inherit it
                items = iter(loader)
            for item in items:  # workers read the loop's epoch and first batch from the ring
                for batch in (map(self.take, item) if ring is not None else (item,)):
                    ds.position += 1
                    yield batch
        finally:
            ds._counting = False
        if ds.epoch == epoch and ds.position >= len(ds):
            ds.epoch, ds.position = epoch + 1, 0


@contextlib.contextmanager
def one_opencv_thread() -> Iterator[None]:
    """OpenCV at one thread inside the block, then as before: DataLoader workers forked in it
    inherit that. A worker is one thread of work: OpenCV's default pool in each
    (a thread per core, spinning between jobs) would take the cores that the other workers and
    the main process share, and a forked child must not resize the pool it inherits
    (``cv2.setNumThreads`` there waits for threads the child does not have: it hangs). Measured
    on 2 cores, 2 workers, NCHW RGB float32 batches of 64 64x64x3 images in groups of 8, timed as
    ``tools/bench_torch.py`` does: 0.61-0.71x the NumPy loader's samples/s with OpenCV's default
    pool in each worker, 0.82-1.00x with one thread."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def start_method(context: Any) -> str:
    """How DataLoader starts its workers with ``multiprocessing_context=context``."""
    if context is None:
        return multiprocessing.get_start_method()
    return context if isinstance(context, str) else context.get_start_method()


def as_is(item: Any) -> Any:
    """The workers' collate function: their items go to the main process as they are."""
    return item


def copy_of(ds: Any) -> Any:
    """A shallow copy of a StoreBatches for a DataLoader (shares the position block, not the engine)."""
    clone = copy.copy(ds)
    clone._loader, clone._scratch, clone._pool = None, {}, None
    return clone
