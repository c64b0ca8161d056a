"""Batches that are safe to keep: a yielded X is never overwritten while the caller references it."""
from __future__ import annotations

import numpy as np
import pytest
from test_loader import make_store

from streamnn.data.loader import Loader


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    out = {}
    for dtype in ("float32", "uint8"):
        path = tmp_path_factory.mktemp("k") / f"{dtype}.h5"
        make_store(path, 61, dtype=dtype)
        out[dtype] = path
    return out


def copied(path, **kw):
    """The epoch's batches, each copied at once (correct under any buffer policy)."""
    with Loader(path, "train", reuse_buffers=True, **kw) as loader:
        return [(X.copy(), Y.copy()) for X, Y in loader]


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
@pytest.mark.parametrize("reader", ["mmap", "pread"])
@pytest.mark.parametrize("policy,prefetch", [("inline", 0), ("thread", 2), ("auto", 1)])
def test_list_of_a_loader_holds_the_right_batches(stores, dtype, reader, policy, prefetch):
    kw = dict(batch_size=5, seed=1, augment="flip", reader=reader, prefetch=prefetch)
    want = copied(stores[dtype], **kw)
    with Loader(stores[dtype], "train", **kw) as loader:
        loader.prefetch_policy = policy
        kept = list(loader)  # the yielded arrays themselves, no copy
        parts = []
        for X, _ in loader:  # a second epoch: keep only a view of each X
            parts.append(X[:, ::2])
    assert len(kept) == len(want) == 13
    for (X, Y), (X0, Y0) in zip(kept, want):
        np.testing.assert_array_equal(X, X0)
        np.testing.assert_array_equal(Y, Y0)
    with Loader(stores[dtype], "train", reuse_buffers=True, **kw) as ref:
        ref.epoch = 1
        second = [X.copy() for X, _ in ref]
    assert len(second) == 13
    for part, X in zip(parts, second):
        np.testing.assert_array_equal(part, X[:, ::2])


def test_a_loop_that_drops_its_batches_reuses_the_same_buffers(stores):
    with Loader(stores["float32"], "train", batch_size=5, prefetch=0) as loader:
        it = iter(loader)
        for _ in range(3):
            next(it)
        ring = [id(b) for b in loader._maker._buffers]
        for X, _ in it:
            assert any(np.shares_memory(X, b) for b in loader._maker._buffers)
        assert [id(b) for b in loader._maker._buffers] == ring  # nothing was allocated anew


def test_reuse_buffers_is_the_old_ring(stores):
    """The opt-in keeps the documented ring: a batch kept past the one after next is overwritten."""
    kw = dict(batch_size=5, seed=2, shuffle=True, prefetch=0)
    want = copied(stores["float32"], **kw)
    with Loader(stores["float32"], "train", reuse_buffers=True, **kw) as loader:
        kept = list(loader)
    assert np.array_equal(kept[-1][0], want[-1][0])
    assert not all(np.array_equal(X, X0) for (X, _), (X0, _) in zip(kept, want))
