"""Shuffled, resumable, shardable mini-batches streamed from a store split (design: docs/loader.md).

Usage::

    with Loader("cats.h5", "train", batch_size=64, seed=7) as loader:
        for epoch in range(10):
            for X, Y in loader:          # one epoch from the current position
                ...                       # X (D, B) float32, Y (1, B) / (K, B)
        state = loader.state_dict()      # str/int dict: resume later, O(1)

* Order: an epoch's order is a pure function of ``(seed, epoch)`` (:mod:`streamnn.data.order`):
  stored order (``shuffle=False``), a uniform permutation (``order="exact"``) or FFCV-like
  shuffled blocks of ``block_rows`` rows within windows of ``window_blocks`` (``order="block"``:
  each chunk read once per epoch; a batch's class mix varies more).
* Sharding: ``batch_size`` is the *global* batch; rank r of ``world_size`` W yields every W-th row
  of it, ``batch[r::W]``; every rank has the same number of batches, no row padded or repeated.
* Batches: X ``(D, b)`` float32 in [0, 1] (``stored * scale``), augmented (``augment``: any of
  "flip", "shift", "erase[=P]" joined by commas; draws a pure function of (seed, epoch, global
  batch, row)) and standardized with the store's ``/stats`` by :mod:`streamnn.data.transforms`
  (erased rectangles are set to 0 after standardization); Y ``(1, b)``
  float32 0/1 for two classes, int64 labels for more, ``(K, b)`` float32 with ``one_hot``.
  A yielded batch is safe to keep (its buffer is reused only once nothing references it);
  ``reuse_buffers=True``: X is valid until the batch two after it is requested. :mod:`.epoch`
  makes the batches, reads ahead and prefetches.
* State: ``position`` counts the global batches handed out in the current epoch; breaking out of
  a ``for`` keeps it, the next ``for`` resumes there. ``state_dict()`` / ``load_state_dict`` (O(1))
  check store fingerprint, split, batch size and subset and adopt the saved order-defining
  settings; each rank keeps its own rank and world size (any rank may load rank 0's state).
* Processes: ``__init__`` only validates the store; the reader and the prefetch thread are made
  on first iteration in the process that iterates and released by ``close()``; a forked child
  opens its own; pickling drops them and keeps the position.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from streamnn.errors import StreamnnError
from streamnn.data.order import ORDERS, batch_span, batches_consumed, block_order, epoch_order, n_batches, samples_consumed, \
    share, share_size
from streamnn.data.epoch import BatchMaker, Takes, epoch_batches
from streamnn.data.readers import READERS
from streamnn.data.remote import is_url
from streamnn.data.store import open_store
from streamnn.data.transforms import DEFAULT_SHIFT, Augment, standardization

__all__ = ["Loader", "block_order", "ORDERS"]
#: Contiguous data: block size of ``order="block"``, in bytes of stored rows.
BLOCK_BYTES = 1 << 20
#: Blocks shuffled together by ``order="block"``.
WINDOW_BLOCKS = 16
STATE_VERSION = 2  # 2: global batches with interleaved shares, position also as samples
#: Default of ``Loader.prefetch_policy``.
PREFETCH_POLICY = "auto"

# Batch makers (h5py handles, threads) and locks of a parent process, kept alive but never touched
# in a forked child (closing them there could deadlock on a lock copied in the locked state).
_ORPHANS: list[Any] = []




#: Largest batch size accepted (a batch is sized by the rows it can hold, but beyond this the
#: value is a mistake; the row arithmetic stays far inside int64).
MAX_BATCH_SIZE = (1 << 31) - 1
#: Largest prefetch depth (a ring of prefetch + 2 batch buffers).
MAX_PREFETCH = 64


def _int(value: Any, name: str, low: int, where: Any = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise StreamnnError(f"{name} must be an integer >= {low}, got {value!r}", where)
    if high is not None and int(value) > high:
        raise StreamnnError(f"{name} must be at most {high:,}, got {int(value):,}", where)
    return int(value)


class Loader:
    """Mini-batches ``(X, Y)`` of one split of a store; see the module docstring.

    Parameters mirror the contract in the module docstring. ``subset``: 1-D array of distinct
    row indices of the split to iterate (e.g. the training part of a train/validation
    split); the epoch permutes the subset. ``block_rows`` / ``window_blocks`` tune
    ``order="block"``.
    """

    def __init__(self, path: str | os.PathLike, split: str, batch_size: int = 64, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, standardize: bool = False, augment: str | None = None,
                 one_hot: bool = False, rank: int = 0, world_size: int = 1, order: str = "exact",
                 prefetch: int = 2, subset: Any = None, block_rows: int | None = None,
                 window_blocks: int = WINDOW_BLOCKS, shift: int = DEFAULT_SHIFT, shift_padding: str = "reflect",
                 reader: str = "auto", reuse_buffers: bool = False) -> None:
        self.path = path if is_url(path) else Path(os.path.abspath(os.fspath(path)))
        self.split = str(split)
        self.batch_size = _int(batch_size, "batch size", 1, self.path, MAX_BATCH_SIZE)
        self.seed = _int(seed, "seed", 0)
        self.world_size = _int(world_size, "world_size", 1)
        self.rank = _int(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise StreamnnError(f"rank {rank} is not below world_size {world_size}")
        self.prefetch = _int(prefetch, "prefetch", 0, high=MAX_PREFETCH)
        if order not in ORDERS:
            raise StreamnnError(f"unknown order {order!r} (choose exact or block)")
        self._augment = Augment.parse(augment, shift, shift_padding)
        self.order, self.augment = order, self._augment.spec
        if reader not in READERS:
            raise StreamnnError(f"unknown reader {reader!r} (choose {', '.join(READERS)})")
        #: I/O of the default store layout: "auto" (by size), "mmap" or "pread" (not part of the state).
        self.reader = reader
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.one_hot, self.standardize = bool(one_hot), bool(standardize)
        self.window_blocks = _int(window_blocks, "window_blocks", 1)
        #: "auto" (thread only while the caller works between batches), "thread" or "inline".
        self.prefetch_policy = PREFETCH_POLICY
        #: The batches the consumer takes (every one, or a DataLoader worker's share): what to read ahead.
        self.takes = Takes()
        #: False (safe): a yielded X is never overwritten while referenced. True: X is valid until the
        #: batch two after it is requested (a loop that drops each batch; no copy of a lent buffer).
        self.reuse_buffers = bool(reuse_buffers)

        with open_store(self.path) as store:
            ds = store.dataset(self.split)  # unknown split: one-line error
            self.fingerprint = store.fingerprint
            self.class_names = list(store.class_names)
            self.image_shape = tuple(store.image_shape)
            self.n_features = store.n_features
            self.split_rows = int(ds.shape[0])
            chunk_rows = int(ds.chunks[0]) if ds.chunks is not None else None
            row_bytes = self.n_features * ds.dtype.itemsize
            labels = store.labels(self.split)
            stats = store.stats() if self.standardize else None
            if self.standardize and stats is None:
                raise StreamnnError("standardize needs the store's /stats (mean, std), which this store "
                                    "does not have (repack it with statistics, or do not standardize)", self.path)
        self.n_classes = len(self.class_names)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise StreamnnError(f"split {self.split!r} has labels outside 0..{self.n_classes - 1}", self.path)
        self._labels = labels.astype(np.int32)
        self.block_rows = (_int(block_rows, "block_rows", 1) if block_rows is not None
                           else chunk_rows or max(1, BLOCK_BYTES // row_bytes))

        self._subset: np.ndarray | None = None
        self._subset_digest = ""
        if subset is not None:
            self._subset, self._subset_digest = self._check_subset(subset)
        self.n_rows = len(self._subset) if self._subset is not None else self.split_rows

        self._mean32 = self._inv32 = None
        if stats is not None:
            mean, std = (np.asarray(a, np.float64) for a in stats)
            if mean.shape != (self.n_features,) or std.shape != (self.n_features,):
                raise StreamnnError(f"store /stats have shapes {mean.shape} and {std.shape}, expected "
                                    f"({self.n_features},)", self.path)
            self._mean32, self._inv32 = standardization(mean, std)

        self.epoch = 0
        self.position = 0
        self._iteration = 0  # counts loops started: an older loop that is resumed raises
        self._maker: BatchMaker | None = None  # of the process that iterates, made on first use
        self._reset_plans()

    # -- validation helpers ----------------------------------------------------------------------
    def _check_subset(self, subset: Any) -> tuple[np.ndarray, str]:
        arr = np.asarray(subset)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise StreamnnError(f"subset must be a 1-D array of row indices, got {arr.dtype} of shape {arr.shape}")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.split_rows):
            raise StreamnnError(f"subset has rows outside 0..{self.split_rows - 1} of split {self.split!r}", self.path)
        if len(np.unique(arr)) != len(arr):
            raise StreamnnError("subset repeats rows (each row may appear once)")
        digest = hashlib.sha256(np.ascontiguousarray(arr, "<i8").tobytes()).hexdigest()[:16]
        return arr, digest

    # -- sizes -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch (global batches: the same number on every rank)."""
        return n_batches(self.n_rows, self.batch_size, self.drop_last)

    @property
    def n_batches(self) -> int:
        return len(self)

    @property
    def local_batch_size(self) -> int:
        """Most rows of a batch this rank yields (its share of a full global batch, or of all the
        rows when the batch size is larger: buffers are sized by this, never by the batch size)."""
        return share_size(min(self.batch_size, self.n_rows), 0, self.world_size)

    def global_batch_size(self, k: int) -> int:
        """Rows of global batch ``k`` over all ranks (the count a mean over the batch divides by)."""
        span = batch_span(self.n_rows, self.batch_size, k)
        return span.stop - span.start

    @property
    def n_samples(self) -> int:
        """Samples per epoch on this rank."""
        full, last = divmod(self.n_rows, self.batch_size)
        rest = share_size(last, self.rank, self.world_size) if last and not self.drop_last else 0
        return full * share_size(self.batch_size, self.rank, self.world_size) + rest

    # -- the order -------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        """All rows of the epoch (stored row numbers), on every rank (cached for the last few epochs)."""
        with self._plan_lock:
            rows = self._plans.get(epoch)
            if rows is None:
                base = self._subset if self._subset is not None else np.arange(self.n_rows, dtype=np.int64)
                rows = np.ascontiguousarray(epoch_order(base, self.seed, epoch, shuffle=self.shuffle, order=self.order,
                                                        block_rows=self.block_rows,
                                                        window_blocks=self.window_blocks), dtype=np.int64)
                self._plans[epoch] = rows
                while len(self._plans) > 3:
                    self._plans.popitem(last=False)
            return rows

    def batch_rows(self, epoch: int, k: int) -> np.ndarray:
        """Stored row numbers of this rank's share of global batch ``k`` of ``epoch``."""
        rows = self._epoch_order(epoch)[batch_span(self.n_rows, self.batch_size, k)]
        return share(rows, self.rank, self.world_size)

    def _reset_plans(self) -> None:
        self._plans: OrderedDict[int, np.ndarray] = OrderedDict()
        self._plan_lock = threading.Lock()

    # -- the batches (streamnn.data.epoch) -------------------------------------------------------
    def _adopt_process(self) -> None:
        """In a forked child, drop (never touch) the parent's batch maker and plan lock."""
        if self._maker is not None and self._maker.pid != os.getpid():
            _ORPHANS.append((self._maker, self._plan_lock))
            self._maker = None
            self._reset_plans()

    def _batches(self) -> BatchMaker:
        """The batch maker of this process (its reader opened on first use)."""
        self._adopt_process()
        if self._maker is None:
            self._maker = BatchMaker(self)
        return self._maker

    @property
    def threaded(self) -> bool:
        """Whether a prefetch thread may produce batches (memory-mapped reader and prefetch > 0)."""
        return self._maker is not None and self._maker.threaded

    @property
    def reader_mode(self) -> str:
        """The I/O strategy: "memmap", "pread", "hdf5" or "chunks" (opens the reader)."""
        return self._batches().reader.mode

    @property
    def batches_threaded(self) -> int:
        """Batches made by the prefetch thread since the reader was opened."""
        return self._maker.batches_threaded if self._maker is not None else 0

    @property
    def batches_inline(self) -> int:
        """Batches made in the caller's thread since the reader was opened."""
        return self._maker.batches_inline if self._maker is not None else 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self._batches()
        if len(self) and self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        self._iteration += 1
        return epoch_batches(self, self._iteration)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, str | int]:
        """Everything needed to continue this stream (str and int values only)."""
        return {
            "version": STATE_VERSION, "fingerprint": self.fingerprint, "split": self.split,
            "seed": self.seed, "epoch": self.epoch, "position": self.position,
            "samples": samples_consumed(self.n_rows, self.batch_size, self.position), "batch_size": self.batch_size,
            "rank": self.rank, "world_size": self.world_size,
            "n_samples": self.n_samples, "n_rows": self.n_rows, "subset": self._subset_digest,
            "order": self.order, "block_rows": self.block_rows, "window_blocks": self.window_blocks,
            "drop_last": int(self.drop_last), "augment": self.augment or "none", "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream saved by :meth:`state_dict` (O(1); nothing changes on error)."""
        if not isinstance(state, Mapping):
            raise StreamnnError(f"loader state must be a dict, got {type(state).__name__}")
        need = ("fingerprint", "split", "seed", "epoch", "position", "batch_size", "world_size",
                "n_rows", "subset", "order", "drop_last", "augment", "shuffle")
        missing = [k for k in need if k not in state]
        if missing:
            raise StreamnnError(f"loader state lacks {', '.join(missing)}")

        def text(key: str) -> str:
            v = state[key]
            return v.decode() if isinstance(v, bytes) else str(v)

        def num(key: str, low: int = 0) -> int:
            v = state[key]
            if isinstance(v, np.ndarray) and v.shape == ():
                v = v.item()
            return _int(v, f"loader state {key}", low)

        if text("fingerprint") != self.fingerprint:
            raise StreamnnError(f"loader state is for another store or the store changed since it was saved "
                                f"(fingerprint {text('fingerprint')[:12]}..., this store {self.fingerprint[:12]}...)",
                                self.path)
        if text("split") != self.split:
            raise StreamnnError(f"loader state is for split {text('split')!r}, this loader reads {self.split!r}")
        if num("batch_size", 1) != self.batch_size:
            raise StreamnnError(f"loader state has batch size {num('batch_size')}, this loader {self.batch_size}")
        if int(state.get("version", 1)) < 2 and num("world_size", 1) > 1:
            raise StreamnnError(f"loader state of version {num('version')} has contiguous shares of "
                                f"{num('world_size')} ranks, which this version does not continue")
        if num("n_rows") != self.n_rows or text("subset") != self._subset_digest:
            raise StreamnnError(f"loader state iterates {num('n_rows')} rows "
                                f"({'a subset' if text('subset') else 'the whole split'}), this loader "
                                f"{self.n_rows} ({'a subset' if self._subset_digest else 'the whole split'})"
                                + (" with other rows" if num("n_rows") == self.n_rows else ""))
        order = text("order")
        if order not in ORDERS:
            raise StreamnnError(f"loader state has unknown order {order!r}")
        try:
            augment = Augment.parse(text("augment"), self._augment.shift or DEFAULT_SHIFT, self._augment.padding)
        except StreamnnError:
            raise StreamnnError(f"loader state has unknown augment {text('augment')!r}") from None
        new = {
            "seed": num("seed"), "order": order, "augment": augment.spec, "_augment": augment,
            "shuffle": bool(num("shuffle")), "drop_last": bool(num("drop_last")),
            "block_rows": num("block_rows", 1) if "block_rows" in state else self.block_rows,
            "window_blocks": num("window_blocks", 1) if "window_blocks" in state else self.window_blocks,
        }
        epoch, position = num("epoch"), num("position")
        nb = n_batches(self.n_rows, self.batch_size, new["drop_last"])
        if position > nb:
            raise StreamnnError(f"loader state is at batch {position} of an epoch that has {nb}")
        if "samples" in state:
            samples = num("samples")
            if samples != samples_consumed(self.n_rows, self.batch_size, position) \
                    or batches_consumed(self.n_rows, self.batch_size, samples) != position:
                raise StreamnnError(f"loader state is at {samples} samples but batch {position}: they disagree")
        # All checked: stop the prefetch work of the old stream, then apply.
        self._adopt_process()
        if self._maker is not None:
            self._maker.forget()
        changed = any(getattr(self, k) != v for k, v in new.items())
        for k, v in new.items():
            setattr(self, k, v)
        if changed:
            with self._plan_lock:
                self._plans.clear()
        if nb and position == nb:
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position
        self._iteration += 1  # a loop that was running stops with a clear error

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the reader, the prefetch thread and the buffers (a later loop reopens them)."""
        self._adopt_process()
        if self._maker is not None:
            self._maker.close()
            self._maker = None
        self._reset_plans()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_maker", "_plans", "_plan_lock"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._iteration = 0
        self._maker = None
        self._reset_plans()

    def __repr__(self) -> str:
        return (f"Loader({str(self.path)!r}, {self.split!r}, batch_size={self.batch_size}, rows={self.n_rows}, "
                f"epoch={self.epoch}, position={self.position}/{len(self)})")
