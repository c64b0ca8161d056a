"""Sizes accepted, then allocated: a batch size far beyond the split's rows allocates for the rows
(not the batch size) and gives the right batches; absurd sizes are refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from streamnn import StreamnnError, open_store
from streamnn.data.loader import MAX_BATCH_SIZE, Loader
from tinystore import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("sizes") / "s.h5")


@pytest.mark.parametrize("reader", ["mmap", "pread"])
def test_huge_batch_size_on_a_tiny_split(store, reader):
    with open_store(store) as s:
        rows = s.read_rows("train", np.arange(s.n_rows("train")))
        labels = s.labels("train")
    with Loader(store, "train", batch_size=10**8, reader=reader, augment="flip,shift", shift=1) as loader:
        assert len(loader) == 1 and loader.local_batch_size == len(rows)
        got = list(loader)
        assert len(got) == 1
        X, Y = got[0]
        order = loader.batch_rows(0, 0)
        assert sorted(order.tolist()) == list(range(len(rows)))
        assert X.shape == (rows.shape[1], len(rows))
        assert np.array_equal(Y.ravel(), labels[order].astype(np.float32))
        assert all(b.shape[0] <= len(rows) for b in loader._maker._buffers)
    with Loader(store, "train", batch_size=10**8, shuffle=False, reader=reader) as loader:
        X, _ = next(iter(loader))
        assert np.array_equal(X.T, rows)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.one_of(st.integers(1, 30), st.integers(30, MAX_BATCH_SIZE)), world=st.integers(1, 3),
       drop_last=st.booleans())
def test_any_batch_size_gives_every_row_once(store, batch_size, world, drop_last):
    seen = []
    for rank in range(world):
        with Loader(store, "train", batch_size=batch_size, rank=rank, world_size=world, seed=3, drop_last=drop_last,
                    prefetch=0) as loader:
            assert loader.local_batch_size <= -(-loader.n_rows // world)
            for k, (X, Y) in enumerate(loader):
                assert X.shape[1] == Y.shape[1] == len(loader.batch_rows(0, k))
                seen.extend(loader.batch_rows(0, k).tolist())
            assert all(b.shape[0] <= loader.n_rows for b in (loader._maker._buffers if loader._maker else []))
    n = 12
    if drop_last and batch_size > n:
        assert seen == []
    else:
        expected = n - (n % batch_size if drop_last else 0)
        assert sorted(seen) == sorted(set(seen)) and len(seen) == expected


@pytest.mark.parametrize("kwargs, words", [
    ({"batch_size": MAX_BATCH_SIZE + 1}, "batch size must be at most"),
    ({"batch_size": 10**30}, "batch size must be at most"),
    ({"batch_size": 0}, "batch size must be an integer >= 1"),
    ({"prefetch": 10**9}, "prefetch must be at most"),
])
def test_absurd_sizes_are_one_line(store, kwargs, words):
    with pytest.raises(StreamnnError, match=words) as err:
        Loader(store, "train", **kwargs)
    assert "\n" not in str(err.value)
