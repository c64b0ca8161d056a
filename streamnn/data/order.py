"""Which rows make batch k of an epoch, and which of them a rank reads: pure functions.

Epoch order. A pure function of ``(seed, epoch)`` (and the rows): the generator is
``np.random.Generator(np.random.PCG64([seed, epoch]))`` (cleaner than ``seed + epoch``, where
seed 1 / epoch 0 would repeat seed 0 / epoch 1).

* ``shuffle=False``: the rows as given (stored order, or a subset in its order).
* ``order="exact"``: ``rng.permutation(n)``, a uniform random permutation.
* ``order="block"``: :func:`block_order`, FFCV-like quasi-random (see docs/loader.md).

Global batches. Batch k of an epoch is positions ``[k*B, min((k+1)*B, n))`` of the epoch
order, whatever the number of ranks: ``B`` is the *global* batch. The last batch is partial
(``n % B`` rows) unless ``drop_last``. A checkpoint's position is therefore the number of
samples consumed in the epoch, ``min(k*B, n)`` after k batches, the same on every rank and for
any world size: a run saved on K ranks resumes on K' ranks at the same sample.

Interleaved shares. Rank r of W takes every W-th row of each global batch,
``batch[r::W]``, so the union of the ranks' rows of batch k is exactly the one-process batch
k (contiguous shares of the epoch would not give that). Shares of one batch differ by at most
one row; where W does not divide a batch (the uneven last batch, or W not dividing B) the
first ``b % W`` ranks hold one row more, and a rank may hold none (b < W). Nothing is padded:
every row is counted once, and means divide by the global count ``b`` (the trainer's business).

Per-row draws. A random draw a rank needs for its rows (a flip, a dropout mask) is taken from
the draw for the whole global batch, ``draw[r::W]``: every rank draws what one process would
draw and keeps its own columns, so the numbers do not depend on W.
"""
from __future__ import annotations

import numpy as np

ORDERS = ("exact", "block")


def epoch_order(rows: np.ndarray, seed: int, epoch: int, *, shuffle: bool = True, order: str = "exact",
                block_rows: int = 1, window_blocks: int = 1) -> np.ndarray:
    """The epoch's order of ``rows`` (stored row numbers, in their given order)."""
    if not shuffle:
        return rows
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    if order == "exact":
        return rows[rng.permutation(len(rows))]
    return block_order(np.sort(rows), block_rows, window_blocks, rng)


def block_order(rows: np.ndarray, block_rows: int, window_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Quasi-random order of sorted ``rows``: permute blocks, then rows within windows of blocks.

    A block is the rows that share ``row // block_rows`` (one chunk of the dataset). Returns a
    permutation of ``rows``.
    """
    n = len(rows)
    if n == 0:
        return rows.copy()
    blk = rows // block_rows
    starts = np.flatnonzero(np.r_[True, blk[1:] != blk[:-1]])
    lengths = np.diff(np.r_[starts, n])
    g = rng.permutation(len(starts))
    L, S = lengths[g], starts[g]
    idx = np.repeat(S - (np.cumsum(L) - L), L) + np.arange(n)
    window = np.repeat(np.arange(len(g)) // window_blocks, L)
    return rows[idx[np.lexsort((rng.random(n), window))]]


def n_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Global batches in an epoch of ``n`` rows."""
    return n // batch_size if drop_last else -(-n // batch_size)


def batch_span(n: int, batch_size: int, k: int) -> slice:
    """Positions of global batch ``k`` in the epoch order."""
    return slice(min(k * batch_size, n), min((k + 1) * batch_size, n))


def samples_consumed(n: int, batch_size: int, k: int) -> int:
    """Samples of the epoch consumed after ``k`` global batches (the resumable position)."""
    return min(k * batch_size, n)


def batches_consumed(n: int, batch_size: int, samples: int) -> int:
    """Inverse of :func:`samples_consumed`: batches done when ``samples`` were consumed."""
    return -(-samples // batch_size)


def share(items: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s interleaved share of a global batch (or of a per-row draw for it)."""
    return items[rank::world_size]


def share_size(b: int, rank: int, world_size: int) -> int:
    """Rows of a ``b``-row global batch held by ``rank``."""
    return len(range(rank, b, world_size))
