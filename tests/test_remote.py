"""Stores read over HTTP (nginx on 127.0.0.1): the same Store API, the same batches as a local copy
(a property test over orders, dtypes, transforms, rank shares, prefetch and resume points)."""
from __future__ import annotations

import re
import shutil
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamnn import StreamnnError, open_store
from streamnn.data.loader import Loader
from streamnn.data.remote import is_url

from servers import Nginx
from test_loader import make_store

DTYPES = ("float32", "uint8")
N = 90


@pytest.fixture(scope="session")
def nginx(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    server = Nginx(root, tmp_path_factory.mktemp("nginx"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def served(nginx, tmp_path_factory):
    """One 90-row store per dtype, local and served: {dtype: (path, url)}."""
    out = {}
    for dtype in DTYPES:
        path = tmp_path_factory.mktemp("s") / f"{dtype}.h5"
        make_store(path, N, dtype)
        shutil.copy(path, nginx.root / path.name)
        out[dtype] = (path, nginx.url(path.name))
    return out


def test_is_url():
    assert is_url("http://h/x.h5") and is_url("HTTPS://h/x.h5") and is_url("s3://b/k")
    assert not is_url("x.h5") and not is_url("/a/http://b")


def test_open_store_by_url_has_the_local_metadata(served):
    path, url = served["uint8"]
    with open_store(path) as local, open_store(url) as remote:
        assert remote.path == url
        for name in ("class_names", "image_shape", "dtype", "scale", "fingerprint", "splits", "options"):
            assert getattr(remote, name) == getattr(local, name), name
        assert remote.counts() == local.counts()
        assert np.array_equal(remote.labels("train"), local.labels("train"))
        assert remote.paths("train") == local.paths("train")
        assert np.array_equal(remote.read_rows("train", [5, 1, 5]), local.read_rows("train", [5, 1, 5]))
        assert all(np.array_equal(a, b) for a, b in zip(remote.stats(), local.stats()))
        assert remote.nbytes() == path.stat().st_size
        remote.verify()


def batches(path, epochs=2, **kw):
    with Loader(path, "train", **kw) as L:
        got = [(X.copy(), Y.copy()) for _ in range(epochs) for X, Y in L]
        mode = L.reader_mode
    return got, mode


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(DTYPES), order=st.sampled_from(["exact", "block", "none"]),
       batch=st.integers(1, 40), n_subset=st.one_of(st.none(), st.integers(0, N)),
       world=st.integers(1, 3), data=st.data(), prefetch=st.sampled_from([0, 2]),
       policy=st.sampled_from(["inline", "thread"]), augment=st.sampled_from([None, "flip", "flip,shift"]),
       standardize=st.booleans(), threads=st.sampled_from([1, 4, 32]))
def test_remote_batches_equal_the_local_ones(served, monkeypatch, dtype, order, batch, n_subset, world, data,
                                             prefetch, policy, augment, standardize, threads):
    path, url = served[dtype]
    rank = data.draw(st.integers(0, world - 1))
    subset = None if n_subset is None else np.random.default_rng(n_subset).permutation(N)[:n_subset]
    kw = dict(batch_size=batch, seed=5, shuffle=order != "none", order="exact" if order == "none" else order,
              subset=subset, rank=rank, world_size=world, prefetch=prefetch, augment=augment, shift=1,
              standardize=standardize, block_rows=5, window_blocks=2)
    monkeypatch.setenv("STREAMNN_REMOTE_THREADS", str(threads))
    monkeypatch.setattr("streamnn.data.loader.PREFETCH_POLICY", policy)
    want, _ = batches(path, **kw)
    got, mode = batches(url, **kw)
    assert mode == "remote"
    assert len(got) == len(want)
    for (x, y), (xw, yw) in zip(got, want):
        assert x.dtype == np.float32 and np.array_equal(x, xw) and np.array_equal(y, yw)  # bit for bit


@pytest.mark.parametrize("stop", [1, 6, 13, 14])
def test_resume_from_a_url_continues_the_local_stream(served, stop):
    path, url = served["uint8"]
    kw = dict(batch_size=7, seed=9, augment="flip", order="block", block_rows=4)
    whole, _ = batches(path, **kw)
    with Loader(url, "train", **kw) as L:
        taken = 0
        while taken < stop:
            for _ in L:
                taken += 1
                if taken == stop:
                    break
        state = L.state_dict()
    with Loader(url, "train", **kw) as M:  # also a local state onto the URL: same fingerprint
        M.load_state_dict(state)
        rest = []
        while M.epoch < 2:
            rest += [X.copy() for X, _ in M]
    assert len(rest) == len(whole) - stop
    assert all(np.array_equal(a, b) for a, (b, _) in zip(rest, whole[stop:]))


def recorded(monkeypatch):
    """The requests of the row reader's threads (not the metadata's), each as its byte ranges."""
    from streamnn.data.remote.objects import RemoteObject
    gets = []
    real = RemoteObject.fetch_many

    def fetch_many(self, ranges):
        if threading.current_thread().name.startswith("streamnn-pread"):
            gets.append([(off, sum(len(s) for s in sinks)) for off, sinks in ranges])
        return real(self, ranges)
    monkeypatch.setattr(RemoteObject, "fetch_many", fetch_many)
    return gets


def test_reads_are_coalesced_and_bytes_are_the_rows(served, monkeypatch):
    """The stored order, batches read ahead together: one run of adjacent rows is one byte
    range of exactly the rows' bytes; a request carries several ranges (nginx answers them)."""
    gets = recorded(monkeypatch)
    path, url = served["float32"]
    with Loader(url, "train", batch_size=30, shuffle=False, prefetch=0) as L:
        next(iter(L))
        row_bytes = L.n_features * 4
    # the first batch, read at once, is one run of 30 adjacent rows: one GET of exactly its bytes;
    # the batches read ahead (this epoch's and the next ones', sorted together) are long runs too
    assert gets[0] == [(L._maker.reader.offsets[0] if L._maker else gets[0][0][0], 30 * row_bytes)]
    spans = [r for g in gets for r in g]
    assert all(size % row_bytes == 0 for _, size in spans)
    assert len(spans) * 30 <= sum(size for _, size in spans) // row_bytes


def test_random_rows_go_several_to_a_request(served, monkeypatch):
    gets = recorded(monkeypatch)
    monkeypatch.setenv("STREAMNN_REMOTE_THREADS", "1")  # one request at a time: the order is visible
    path, url = served["uint8"]
    with Loader(url, "train", batch_size=32, seed=2, prefetch=0) as L:
        rows = L.batch_rows(0, 0)
        next(iter(L))
        offset, row_bytes = L._maker.reader.offsets[0], L._maker.reader.row_bytes
    # 32 random rows, one thread: two requests of the runs of 16 rows each (MAX_RANGES)
    got = [(off - offset) // row_bytes + i for g in gets[:2] for off, size in g for i in range(size // row_bytes)]
    assert sorted(got) == sorted(rows.tolist())
    assert all(1 < len(g) <= 16 for g in gets[:2])


def test_the_first_batch_is_not_queued_behind_the_reads_ahead(served, monkeypatch):
    gets = recorded(monkeypatch)
    path, url = served["uint8"]
    monkeypatch.setenv("STREAMNN_REMOTE_THREADS", "1")  # one request at a time: the order is visible
    with Loader(url, "train", batch_size=4, seed=2, prefetch=0) as L:
        first = L.batch_rows(0, 0)
        next(iter(L))
        offset = L._maker.reader.offsets[0]
        row_bytes = L._maker.reader.row_bytes
    assert sorted((off - offset) // row_bytes for off, _ in gets[0]) == sorted(first.tolist())


@pytest.mark.parametrize("name, message", [("missing.h5", "no such object (HTTP 404)"),
                                           ("notastore.h5", "not an HDF5 file")])
def test_bad_urls_are_one_line_errors(nginx, name, message):
    (nginx.root / "notastore.h5").write_bytes(b"hello" * 100)
    with pytest.raises(StreamnnError, match=re.escape(message)) as info:
        open_store(nginx.url(name))
    assert "\n" not in str(info.value) and nginx.url(name) in str(info.value)


def test_credentials_in_a_url_are_refused(nginx):
    url = nginx.url("x.h5").replace("http://", "http://user:secret@")
    with pytest.raises(StreamnnError, match="credentials in a URL") as info:
        open_store(url)
    assert "secret" not in str(info.value)


def test_compressed_store_is_a_one_line_error_for_the_loader(nginx, tmp_path):
    make_store(tmp_path / "z.h5", 20, "uint8", compression="lzf")
    shutil.copy(tmp_path / "z.h5", nginx.root / "z.h5")
    with Loader(nginx.url("z.h5"), "train", batch_size=4) as L, pytest.raises(StreamnnError, match="compress"):
        next(iter(L))
