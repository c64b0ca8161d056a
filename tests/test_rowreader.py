"""The pread reader: the same batches as the memory map, coalesced reads, nothing mapped, threads."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamnn.data.readers as rr
from streamnn import StreamnnError, open_store
from streamnn.data.loader import Loader

from test_loader import _in_child, make_store, row_ids

DTYPES = ("float32", "float16", "uint8")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One 90-row store per stored dtype: {dtype: (path, pixels)}."""
    out = {}
    for dtype in DTYPES:
        path = tmp_path_factory.mktemp("r") / f"{dtype}.h5"
        px, _ = make_store(path, 90, dtype)
        out[dtype] = (path, px)
    return out


def batches(path, reader, epochs=2, **kw):
    with Loader(path, "train", reader=reader, **kw) as L:
        got = [(X.copy(), Y.copy()) for _ in range(epochs) for X, Y in L]
        assert L.reader_mode == ("pread" if reader == "pread" else "memmap")
    return got


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(DTYPES), order=st.sampled_from(["exact", "block", "none"]),
       batch=st.integers(1, 40), n_subset=st.one_of(st.none(), st.integers(0, 90)),
       world=st.integers(1, 3), data=st.data(), prefetch=st.sampled_from([0, 1, 3]),
       policy=st.sampled_from(["inline", "thread"]), augment=st.sampled_from([None, "flip", "flip,shift"]),
       standardize=st.booleans(),
       drop_last=st.booleans(), threads=st.sampled_from([1, 3, 16]), block_rows=st.integers(1, 12),
       row_copies=st.booleans())
def test_pread_batches_equal_the_memory_maps(stores, monkeypatch, dtype, order, batch, n_subset, world, data,
                                             prefetch, policy, augment, standardize, drop_last, threads, block_rows,
                                             row_copies):
    path, _ = stores[dtype]
    # The map gathers by np.take or (rows of ROW_COPY_BYTES or more) one copy per row: both here.
    monkeypatch.setattr("streamnn.data.readers.mmap.ROW_COPY_BYTES", 0 if row_copies else 1 << 40)
    rank = data.draw(st.integers(0, world - 1))
    subset = None if n_subset is None else np.random.default_rng(n_subset).permutation(90)[:n_subset]
    kw = dict(batch_size=batch, seed=5, shuffle=order != "none", order="exact" if order == "none" else order,
              subset=subset, rank=rank, world_size=world, prefetch=prefetch, augment=augment, shift=1,
              standardize=standardize, drop_last=drop_last, block_rows=block_rows, window_blocks=2)
    monkeypatch.setattr(rr, "PREAD_THREADS", threads)
    monkeypatch.setattr("streamnn.data.loader.PREFETCH_POLICY", policy)
    want = batches(path, "mmap", **kw)
    got = batches(path, "pread", **kw)
    assert len(got) == len(want)
    for (x, y), (xw, yw) in zip(got, want):
        assert x.dtype == np.float32 and x.shape == xw.shape
        assert np.array_equal(x, xw) and np.array_equal(y, yw)  # bit for bit


def test_batches_stay_valid_through_the_next_two(stores, monkeypatch):
    """The batch buffers the reader lends are not reused while the caller may hold them."""
    monkeypatch.setattr("streamnn.data.loader.PREFETCH_POLICY", "thread")
    monkeypatch.setattr(rr.pread, "AHEAD_ROWS", 8)  # one batch ahead: buffers are reused soon
    path, px = stores["float32"]
    with Loader(path, "train", 8, seed=2, reader="pread", prefetch=3) as L:
        held = []
        for _ in range(3):
            for X, _ in L:
                held.append((X, X.copy()))
                # Let the prefetch thread finish what it started (its reads reuse buffers).
                concurrent.futures.wait([f for f, _ in L._maker.pending.values() if f is not None])
                for x, copy in held[-2:]:
                    assert np.array_equal(x, copy)
        assert len({r for _, copy in held for r in row_ids(copy, px)}) == 90


def test_runs_of_adjacent_rows_are_one_read_each(stores, monkeypatch):
    path, px = stores["uint8"]
    reader = rr.open_rows(path, "train", reader="pread", threads=4)
    try:
        calls = []
        real = os.preadv
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: calls.append(len(bufs)) or real(fd, bufs, off))
        rows = np.array([6, 5, 21, 7, 3, 20, 8, 5])  # runs 3 | 5 6 7 8 | 5 (a repeat) | 20 21
        out = np.empty((len(rows), px.shape[1]), np.float32)
        assert reader.read(rows, out) is out
        assert sorted(calls) == [1, 1, 2, 4]
        np.testing.assert_array_equal(out, px[rows] * np.float32(1 / 255))
        # A run longer than MAX_RUN_BYTES is split (and its parts read in parallel).
        calls.clear()
        reader._run_rows = 4
        out = np.empty((10, px.shape[1]), np.float32)
        reader.read(np.arange(10, 20), out)
        assert sorted(calls) == [2, 4, 4]
        np.testing.assert_array_equal(out, px[10:20] * np.float32(1 / 255))
    finally:
        reader.close()


def test_runs_cross_the_batches_read_together(stores):
    """Batches announced together are read as one set of runs (block order: whole blocks)."""
    path, px = stores["float32"]
    with open_store(path) as store:
        want = store.read_rows("train", np.arange(90))
    reader = rr.open_rows(path, "train", reader="pread", threads=3)
    try:
        reader.group_rows = 30
        perm = np.random.default_rng(0).permutation(np.r_[0:20, 40:50])  # two runs, shuffled
        parts = [perm[0:12], perm[12:24], perm[24:]]
        for k, rows in enumerate(parts):
            reader.expect(k, rows)
        for k, rows in enumerate(parts):
            out = np.empty((len(rows), px.shape[1]), np.float32)
            got = reader.read(rows, out, key=k)
            assert np.array_equal(got, want[rows])
        assert reader.calls == 2
        # A row asked for twice (shard padding) is read twice, without breaking the runs.
        reader.expect(3, np.r_[5:10])
        reader.expect(4, np.r_[0:10])
        reader.expect(5, np.r_[10:25])
        got = reader.read(np.r_[0:10], np.empty((10, px.shape[1]), np.float32), key=4)
        assert np.array_equal(got, want[0:10])
        assert reader.calls == 2 + 2  # 0..24 once, then 5..9 again
    finally:
        reader.close()


def test_stored_order_is_one_read_per_batch(stores, monkeypatch):
    monkeypatch.setattr(rr.pread, "AHEAD_ROWS", 30)  # one batch ahead, sent alone
    path, px = stores["float16"]
    with Loader(path, "train", 30, shuffle=False, reader="pread", prefetch=0) as L:
        for X, _ in L:
            assert row_ids(X, px) == L.batch_rows(L.epoch, L.position - 1).tolist()
        assert L._maker.reader.calls == 3


def test_short_reads_are_completed(stores, monkeypatch):
    """preadv may return fewer bytes than asked (signals, network file systems)."""
    path, _ = stores["float32"]
    want = batches(path, "mmap", epochs=1, batch_size=16, seed=1)
    real = os.preadv

    def short(fd, bufs, offset):
        view = memoryview(bufs[0]).cast("B")
        return real(fd, [view[:min(len(view), 100)]], offset)  # at most 100 bytes a call

    monkeypatch.setattr(os, "preadv", short)
    got = batches(path, "pread", epochs=1, batch_size=16, seed=1)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(got, want)) and len(got) == len(want)


def _mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(os.fspath(path)) for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
def test_pread_maps_nothing_of_the_store(stores):
    path, _ = stores["float32"]
    with Loader(path, "train", 8, reader="mmap") as L:
        next(iter(L))
        assert _mapped(path)  # the check can see a map
    with Loader(path, "train", 8, reader="pread") as L:
        for _ in L:
            assert not _mapped(path)


def test_pread_drops_the_head_of_x_that_h5py_read(stores, monkeypatch):
    """h5py's reads on opening leave readahead marks in X's first pages, which would start
    readahead on the reader's own reads despite POSIX_FADV_RANDOM: the reader drops them."""
    path, _ = stores["uint8"]
    with open_store(path) as s:
        offset, nbytes = s.layout("train")["offsets"][0], s.n_rows("train") * s.n_features
    advice = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, *a: advice.append(a) or real(fd, *a))
    r = rr.open_rows(path, "train", reader="pread")
    r.close()
    assert (offset, nbytes, os.POSIX_FADV_RANDOM) in advice
    assert (offset, min(nbytes, rr.pread.HEAD_BYTES), os.POSIX_FADV_DONTNEED) in advice


def _pread_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("streamnn-pread")]


def test_close_joins_the_threads_and_a_later_loop_reopens(stores):
    path, px = stores["uint8"]
    assert not _pread_threads()
    L = Loader(path, "train", 8, reader="pread")
    assert not _pread_threads()  # created lazily, by the first read
    first = [row_ids(X, px) for X, _ in L]
    assert _pread_threads()
    L.close()
    assert not _pread_threads()
    L.epoch = 0
    assert [row_ids(X, px) for X, _ in L] == first
    L.close()
    assert not _pread_threads()


def test_resume_mid_epoch_with_pread(stores):
    path, px = stores["float16"]
    kw = dict(batch_size=7, seed=9, reader="pread", augment="flip", order="block", block_rows=4)
    with Loader(path, "train", **kw) as L:
        whole = [X.copy() for _ in range(2) for X, _ in L]
    assert len(whole) == 26
    for stop in (1, 5, 12, 13, 17):  # batches taken before the state is saved
        with Loader(path, "train", **kw) as L:
            taken = 0
            while taken < stop:
                for _ in L:
                    taken += 1
                    if taken == stop:
                        break
            state = L.state_dict()
        with Loader(path, "train", **kw) as M:
            M.load_state_dict(state)
            rest = []
            while M.epoch < 2:
                rest += [X.copy() for X, _ in M]
        assert len(rest) == len(whole) - stop
        assert all(np.array_equal(a, b) for a, b in zip(rest, whole[stop:]))


def _epoch_ids(loader, queue):
    queue.put([row_ids(X, PX) for X, _ in loader])


PX = None


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pread_loader_in_a_child_process(stores, monkeypatch, method):
    global PX
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {method!r} does not exist on this platform")
    monkeypatch.setattr("streamnn.data.loader.PREFETCH_POLICY", "thread")
    path, PX = stores["uint8"]
    with Loader(path, "train", 9, seed=4, reader="pread") as L:
        expected = [row_ids(X, PX) for X, _ in L][1:]
    with Loader(path, "train", 9, seed=4, reader="pread") as L:
        next(iter(L))  # the parent's pool is running and has read ahead
        if method == "spawn":
            got = _in_child(method, _spawned_epoch, (L, PX))
        else:
            got = _in_child(method, _epoch_ids, L)
        assert got == expected
        assert [row_ids(X, PX) for X, _ in L] == expected  # the parent carries on


def _spawned_epoch(arg, queue):
    global PX
    loader, PX = arg
    _epoch_ids(loader, queue)


def test_automatic_choice_follows_available_memory(stores, monkeypatch):
    path, _ = stores["float32"]
    nbytes = 90 * 60 * 4
    monkeypatch.setattr(rr, "available_memory", lambda: int(nbytes / rr.FIT_FRACTION) - 1)
    assert not rr.fits_in_memory(nbytes)
    with Loader(path, "train", 8) as L:
        assert L.reader_mode == "pread"
    with Loader(path, "train", 8, reader="mmap") as L:
        assert L.reader_mode == "memmap"
    monkeypatch.setattr(rr, "available_memory", lambda: int(nbytes / rr.FIT_FRACTION))
    with Loader(path, "train", 8) as L:
        assert L.reader_mode == "memmap"
    monkeypatch.setattr(rr, "available_memory", lambda: None)  # unknown: the map
    with Loader(path, "train", 8) as L:
        assert L.reader_mode == "memmap"


def test_available_memory_reads_this_machine():
    avail = rr.available_memory()
    if os.path.exists("/proc/meminfo"):
        assert avail is not None and avail > 0


def test_unknown_reader_is_a_one_line_error(stores):
    path, _ = stores["float32"]
    with pytest.raises(StreamnnError, match="unknown reader 'disk'"):
        Loader(path, "train", 8, reader="disk")


def test_chunked_stores_are_read_by_chunks_whatever_the_reader(tmp_path):
    path = tmp_path / "c.h5"
    px, _ = make_store(path, 40, "uint8", "lzf")
    with Loader(path, "train", 8, reader="pread") as L:
        assert L.reader_mode == "chunks"
        assert sorted(sum((row_ids(X, px) for X, _ in L), [])) == list(range(40))


def test_training_reads_with_the_reader_asked_and_may_switch_on_resume(tmp_path):
    from click.testing import CliRunner

    from streamnn.run.checkpoint import differences, load_checkpoint
    from streamnn.cli.train import main as train_main
    from streamnn.run.trainer import LATEST
    from test_train import make_store as make_train_store

    store = make_train_store(tmp_path / "t.h5")
    args = [str(store), "--hidden", "8", "--batch-size", "16", "--eval-split", "none", "--no-progress"]
    r = CliRunner().invoke(train_main, [*args, "--epochs", "1", "--reader", "pread", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0 and "reading the store with pread (--reader pread)" in r.output, r.output
    r = CliRunner().invoke(train_main, [*args, "--epochs", "2", "--reader", "mmap", "--out", str(tmp_path / "a"),
                                        "--resume"])
    assert r.exit_code == 0 and "reading the store with memmap (--reader mmap)" in r.output, r.output
    r = CliRunner().invoke(train_main, [*args, "--epochs", "2", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0 and "reading the store with memmap (--reader auto)" in r.output, r.output
    a, b = (load_checkpoint(tmp_path / run / LATEST) for run in ("a", "b"))
    for part in ("model", "optimizer", "loader", "history"):  # the reader changes no bit
        assert a[part] and not differences(a[part], b[part]), part
