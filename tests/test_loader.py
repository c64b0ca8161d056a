"""The loader: coverage per epoch, order, resume, sharding, values, processes, memory."""
from __future__ import annotations

import multiprocessing
import pickle
import tracemalloc
from collections import Counter

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamnn import StoreWriter, StreamnnError, open_store
from streamnn.data.loader import Loader, block_order

SHAPE = (4, 5, 3)
D = 60
ID = (SHAPE[1] // 2) * SHAPE[2]  # features holding the row number (see make_store)


def make_store(path, n=50, dtype="float32", compression=None, classes=("cats", "dogs"), stats=True,
               shape=SHAPE, seed=0, split="train"):
    """A store whose rows are all distinct; returns (pixels (n, D) uint8, labels)."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    px = rng.integers(0, 256, (n, d), dtype=np.uint8)
    h, w, c = shape
    for col in (w // 2, w - 1 - w // 2):  # the row number, in two channels of a pixel the flip keeps
        px[:, col * c] = np.arange(n) % 256
        px[:, col * c + 1] = np.arange(n) // 256
    labels = rng.integers(0, len(classes), n)
    with StoreWriter(path, class_names=list(classes), image_shape=shape, dtype=dtype,
                     compression=compression) as w:
        w.add_split(split, n)
        for i in range(0, n, 1000):
            w.write_rows(split, px[i:i + 1000].reshape(-1, *shape), labels[i:i + 1000],
                         [f"p/{j}" for j in range(i, min(n, i + 1000))])
        if stats:
            w.set_stats(rng.random(d) * 0.5 + 0.25, rng.random(d) * 0.3 + 0.05)
        w.commit()
    return px, labels


@pytest.fixture
def threaded(monkeypatch):
    """Loaders made in the test prefetch in their thread whatever the caller's speed."""
    monkeypatch.setattr("streamnn.data.loader.PREFETCH_POLICY", "thread")


@pytest.fixture(scope="module")
def store50(tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "s50.h5"
    px, labels = make_store(path, 50)
    return path, px, labels


def row_ids(X, px):
    """Stored row index of every column of X (rows are identified by their first two pixels)."""
    p = np.rint(X[ID:ID + 2] * 255).astype(np.int64)
    ids = p[0] + 256 * p[1]
    assert np.array_equal(px[ids, ID], p[0])
    return ids.tolist()


def epoch_rows(loader, px):
    return [row_ids(X, px) for X, _ in loader]


# -- coverage ---------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 50), batch=st.integers(1, 20), drop_last=st.booleans(), world=st.integers(1, 4),
       shuffle=st.booleans(), order=st.sampled_from(["exact", "block"]), block_rows=st.integers(1, 9),
       prefetch=st.sampled_from([0, 2]), augment=st.sampled_from([None, "flip", "shift=1/reflect", "flip,shift=2/zero"]))
def test_ranks_together_give_the_one_process_batches(store50, threaded, n, batch, drop_last, world, shuffle, order,
                                                     block_rows, prefetch, augment):
    """Every epoch yields every sample once; rank r of W yields rows r, r+W, ... of each one-process batch."""
    path, px, _ = store50
    subset = np.random.default_rng(n).permutation(50)[:n]

    def loader(rank, world_size):
        return Loader(path, "train", batch, shuffle=shuffle, drop_last=drop_last, rank=rank, world_size=world_size,
                      order=order, subset=subset, block_rows=block_rows, window_blocks=2, prefetch=prefetch,
                      augment=augment)

    one, ranks = loader(0, 1), [loader(r, world) for r in range(world)]
    try:
        def batches(L, epoch):
            out = [(L.batch_rows(epoch, k).tolist(), X.copy()) for k, (X, _) in enumerate(L)]
            if not augment:  # the pixels say which rows were read (a shift moves the pixels that tell)
                assert all(ids == row_ids(X, px) for ids, X in out)
            return out

        for epoch in range(2):
            whole = batches(one, epoch)
            assert len(whole) == len(one) and one.epoch == epoch + 1
            assert all(len(ids) == batch for ids, _ in whole[:-1])
            seen = [i for ids, _ in whole for i in ids]
            assert len(seen) == len(set(seen))  # every row at most once
            assert len(seen) == ((n // batch) * batch if drop_last else n)
            if not shuffle:
                assert seen == subset.tolist()[:len(seen)]
            for r, L in enumerate(ranks):
                assert L.epoch == epoch and L.position == 0 and len(L) == len(one)
                got = batches(L, epoch)
                assert len(got) == len(whole) and L.epoch == epoch + 1
                assert sum(len(ids) for ids, _ in got) == L.n_samples
                for k, ((ids, X), (all_ids, all_X)) in enumerate(zip(got, whole)):
                    assert ids == all_ids[r::world]  # the interleaved share of batch k
                    assert np.array_equal(X, all_X[:, r::world])  # same pixels, same flips
                    assert L.global_batch_size(k) == len(all_ids)
    finally:
        for L in [one, *ranks]:
            L.close()


def test_block_order_is_a_permutation_of_local_windows():
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(1000, 700, replace=False))
    out = block_order(rows, 10, 3, np.random.default_rng(1))
    assert sorted(out.tolist()) == rows.tolist() and not np.array_equal(out, rows)
    # The output is a sequence of windows, each made of all rows of 3 whole blocks.
    sizes = Counter((rows // 10).tolist())
    seq, pos, windows = (out // 10).tolist(), 0, 0
    while pos < len(seq):
        seen, count = set(), 0
        while True:
            seen.add(seq[pos])
            count, pos = count + 1, pos + 1
            assert len(seen) <= 3
            if count == sum(sizes[b] for b in seen) and (len(seen) == 3 or pos == len(seq)):
                break
        windows += 1
    assert windows == -(-len(sizes) // 3)


# -- order ------------------------------------------------------------------------------------------
def test_exact_order_is_the_documented_permutation(store50):
    path, px, _ = store50
    with Loader(path, "train", 8, seed=11) as L:
        for epoch in range(3):
            expected = np.random.Generator(np.random.PCG64([11, epoch])).permutation(50)
            assert sum(epoch_rows(L, px), []) == expected.tolist()


def test_orders_differ_across_epochs_and_repeat_across_prefetch(store50, threaded):
    path, px, _ = store50
    runs = {}
    for prefetch in (0, 1, 3):
        for order in ("exact", "block"):
            with Loader(path, "train", 7, seed=5, prefetch=prefetch, order=order, block_rows=4,
                        augment="flip") as L:
                runs[prefetch, order] = [(row_ids(X, px), X.copy()) for _epoch in range(3) for X, _y in L]
    for order in ("exact", "block"):
        base = runs[0, order]
        for prefetch in (1, 3):
            other = runs[prefetch, order]
            assert [b[0] for b in base] == [b[0] for b in other]
            assert all(np.array_equal(a[1], b[1]) for a, b in zip(base, other))  # same flips too
        per_epoch = len(base) // 3
        epochs = [sum((b[0] for b in base[e * per_epoch:(e + 1) * per_epoch]), []) for e in range(3)]
        assert len({tuple(e) for e in epochs}) == 3 and all(sorted(e) == list(range(50)) for e in epochs)
    with Loader(path, "train", 7, seed=6) as L:
        assert sum(epoch_rows(L, px), []) != sum((b[0] for b in runs[0, "exact"][:per_epoch]), [])


def test_prefetch_policies_give_the_same_batches(store50):
    import time

    path, px, _ = store50
    runs = {}
    for policy in ("inline", "thread", "auto"):
        with Loader(path, "train", 4, seed=3, augment="flip", prefetch=2) as L:
            L.prefetch_policy = policy
            got = []
            for e in range(2):
                for i, (X, _) in enumerate(L):
                    got.append(X.copy())
                    if policy == "auto" and e == 0:
                        time.sleep(0.002 if i < 6 else 0)  # a slow caller, then a fast one
            runs[policy] = got
            assert L.threaded and L.reader_mode == "memmap"
            if policy == "thread":
                assert L.batches_inline == 0
            if policy == "inline":
                assert L.batches_threaded == 0
    for policy in ("thread", "auto"):
        assert all(np.array_equal(a, b) for a, b in zip(runs["inline"], runs[policy]))


def test_no_shuffle_gives_stored_order_and_subset_order(store50):
    path, px, _ = store50
    with Loader(path, "train", 16, shuffle=False) as L:
        assert sum(epoch_rows(L, px), []) == list(range(50))
        assert sum(epoch_rows(L, px), []) == list(range(50))
    sub = np.array([9, 3, 40, 0, 12])
    with Loader(path, "train", 2, shuffle=False, subset=sub) as L:
        assert sum(epoch_rows(L, px), []) == sub.tolist()
    with Loader(path, "train", 2, subset=sub, seed=1) as L:
        assert sorted(sum(epoch_rows(L, px), [])) == sorted(sub.tolist())


# -- state ------------------------------------------------------------------------------------------
def stream(L, px, n_batches):
    """The next n_batches batches across epochs: (epoch, ids, X copy)."""
    out = []
    while len(out) < n_batches:
        for X, _ in L:
            out.append((row_ids(X, px), X.copy()))
            if len(out) == n_batches:
                break
    return out


@pytest.mark.parametrize("kw", [dict(order="exact", augment="flip", prefetch=2),
                                dict(order="block", block_rows=3, prefetch=0),
                                dict(world_size=3, rank=1, drop_last=True, prefetch=1)])
def test_resume_at_every_position_equals_uninterrupted(store50, threaded, kw):
    path, px, _ = store50
    with Loader(path, "train", 6, seed=21, **kw) as L:
        nb = len(L)
        full = stream(L, px, 3 * nb)
    for cut in range(0, 2 * nb + 1):
        with Loader(path, "train", 6, seed=21, **kw) as A:
            head = stream(A, px, cut)
            state = A.state_dict()
        assert all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in state.values())
        with Loader(path, "train", 6, seed=0, **kw) as B:  # seed comes from the state
            B.load_state_dict(state)
            assert (B.epoch, B.position) == ((cut // nb, cut % nb))
            tail = stream(B, px, 3 * nb - cut)
        got = head + tail
        assert [g[0] for g in got] == [f[0] for f in full]
        assert all(np.array_equal(g[1], f[1]) for g, f in zip(got, full))


def test_state_saved_on_some_ranks_continues_on_any_number(store50):
    """Elastic resume: the position is in global batches (and samples), so W=2 -> W'=1 or 3 continues the stream."""
    path, px, _ = store50
    with Loader(path, "train", 6, seed=5, augment="flip") as one:
        full = [(row_ids(X, px), X.copy()) for X, _ in one]
    with Loader(path, "train", 6, seed=5, augment="flip", rank=1, world_size=2) as L:
        for _ in zip(range(3), L):
            pass
        state = L.state_dict()
    assert state["samples"] == 18 and state["position"] == 3
    for world in (1, 3):
        tails = []
        for r in range(world):
            with Loader(path, "train", 6, seed=0, rank=r, world_size=world) as M:
                M.load_state_dict(state)
                tails.append([(row_ids(X, px), X.copy()) for X, _ in M])
        for k, (ids, X) in enumerate(full[3:]):
            for r in range(world):
                assert tails[r][k][0] == ids[r::world] and np.array_equal(tails[r][k][1], X[:, r::world])


def test_break_resumes_mid_epoch_in_the_same_loader(store50):
    path, px, _ = store50
    with Loader(path, "train", 8, seed=2) as L:
        full = sum(epoch_rows(L, px), [])
    with Loader(path, "train", 8, seed=2) as L:
        got = []
        for X, _ in L:
            got += row_ids(X, px)
            break
        assert (L.epoch, L.position) == (0, 1)
        for i, (X, _) in enumerate(L):
            got += row_ids(X, px)
            if i == 2:
                break
        got += sum(epoch_rows(L, px), [])
        assert got == full and (L.epoch, L.position) == (1, 0)
        # Breaking after the last batch: the next loop starts the next epoch.
        for X, _ in L:
            pass
        assert (L.epoch, L.position) == (2, 0)
        for i, (X, _) in enumerate(L):
            if i == len(L) - 1:
                break
        assert (L.epoch, L.position) == (2, len(L))
        state = L.state_dict()
        next(iter(L))
        assert (L.epoch, L.position) == (3, 1)
        L.load_state_dict(state)
        assert (L.epoch, L.position) == (3, 0)


def test_state_errors_change_nothing(store50, tmp_path):
    path, px, _ = store50
    other = tmp_path / "other.h5"
    make_store(other, 50, seed=1)
    with Loader(path, "train", 8, seed=4) as L:
        next(iter(L))
        good = L.state_dict()
    bad = {
        "fingerprint": dict(good, fingerprint="0" * 64),
        "split": dict(good, split="test"),
        "batch size": dict(good, batch_size=16),
        "contiguous shares": dict(good, version=1, world_size=2),
        "disagree": dict(good, samples=good["samples"] + 1),
        "rows": dict(good, n_rows=40),
        "subset": dict(good, subset="abc"),
        "batch 99": dict(good, position=99),
        "lacks": {k: v for k, v in good.items() if k != "epoch"},
    }
    with Loader(path, "train", 8, seed=9, order="block") as L:
        before = L.state_dict()
        for word, state in bad.items():
            with pytest.raises(StreamnnError, match=word) as e:
                L.load_state_dict(state)
            assert "\n" not in str(e.value)
            assert L.state_dict() == before
    with Loader(other, "train", 8) as L, pytest.raises(StreamnnError, match="another store"):
        L.load_state_dict(good)
    with Loader(path, "train", 8, subset=np.arange(50)[::-1]) as L, pytest.raises(StreamnnError, match="subset"):
        L.load_state_dict(good)


def test_pickle_keeps_position_and_drops_resources(store50):
    path, px, _ = store50
    with Loader(path, "train", 8, seed=3) as L:
        it = iter(L)
        next(it)
        next(it)
        blob = pickle.dumps(L)
        rest = sum(epoch_rows(L, px), [])
    M = pickle.loads(blob)
    assert (M.epoch, M.position) == (0, 2)
    assert sum(epoch_rows(M, px), []) == rest
    M.close()


# -- values -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("compression", [None, "lzf"])
def test_values_equal_normalized_stored_rows(tmp_path, dtype, compression):
    path = tmp_path / "s.h5"
    px, labels = make_store(path, 300, dtype, compression)
    with open_store(path) as s:
        expected = s.read_rows("train", np.arange(300))
    tol = 5e-4 if dtype == "float16" else 1e-7
    np.testing.assert_allclose(expected, px / 255.0, atol=tol)
    for order in ("exact", "block"):
        with Loader(path, "train", 32, seed=1, order=order) as L:
            assert L.reader_mode == ("chunks" if compression else "memmap")
            seen = 0
            for X, Y in L:
                assert X.dtype == np.float32 and X.shape[0] == D and X.flags.f_contiguous
                ids = L.batch_rows(L.epoch, L.position - 1)
                assert np.array_equal(X, expected[ids].T)  # bitwise equal to Store.read_rows
                assert Y.dtype == np.float32 and Y.shape == (1, len(ids))
                assert np.array_equal(Y[0], labels[ids])
                seen += len(ids)
            assert seen == 300


def test_hdf5_fallback_reader(tmp_path, monkeypatch):
    import streamnn.data.readers as rr

    path = tmp_path / "s.h5"
    px, _ = make_store(path, 100, "uint8")
    real = rr.open_rows
    monkeypatch.setattr("streamnn.data.epoch.open_rows", lambda *a, **k: real(*a, **dict(k, allow_memmap=False)))
    with Loader(path, "train", 16, world_size=3, rank=2) as L:
        assert L.reader_mode == "hdf5"
        for X, _ in L:
            ids = L.batch_rows(L.epoch, L.position - 1)
            assert np.array_equal(X, (px[ids] * np.float32(1 / 255)).T)


def test_block_order_reads_each_chunk_once(tmp_path):
    path = tmp_path / "s.h5"
    n = 1200
    make_store(path, n, "float32", "lzf", shape=(32, 32, 3), stats=False)
    with open_store(path) as s:
        band = s.dataset("train").chunks[0]
    bands = -(-n // band)
    assert bands >= 12
    with Loader(path, "train", 64, order="block", window_blocks=4, prefetch=0) as L:
        assert L.block_rows == band and L.reader_mode == "chunks"
        for epoch in range(2):
            for _ in L:
                pass
            # A cache of window + 2 bands suffices, even for batches that straddle two windows.
            # (Bands still cached from the previous epoch may be reused.)
            assert bands * epoch < L._maker.reader.bands_read <= (epoch + 1) * bands
            if epoch == 0:
                assert L._maker.reader.bands_read == bands


@pytest.mark.parametrize("one_hot", [False, True])
def test_targets_for_many_classes(tmp_path, one_hot):
    path = tmp_path / "s.h5"
    px, labels = make_store(path, 40, classes=("a", "b", "c"))
    with Loader(path, "train", 16, one_hot=one_hot, shuffle=False) as L:
        X, Y = next(iter(L))
    if one_hot:
        assert Y.shape == (3, 16) and Y.dtype == np.float32
        assert np.array_equal(Y.argmax(0), labels[:16]) and np.all(Y.sum(0) == 1)
    else:
        assert Y.shape == (1, 16) and Y.dtype == np.int64 and np.array_equal(Y[0], labels[:16])


def test_standardize_matches_store_stats(store50):
    path, px, _ = store50
    with open_store(path) as s:
        mean, std = s.stats()
        rows = s.read_rows("train", np.arange(50))
    expected = (rows - mean.astype(np.float32)) * (1 / std).astype(np.float32)
    with Loader(path, "train", 50, shuffle=False, standardize=True) as L:
        X, _ = next(iter(L))
    assert np.array_equal(X, expected.T.astype(np.float32))
    try:
        from streamnn.run.evaluate import Preprocess
    except Exception:  # pragma: no cover - another module of the project
        return
    assert np.array_equal(X, Preprocess(SHAPE, mean, std)(rows.T))


def test_flip_mirrors_about_half_and_composes_with_standardize(store50):
    path, px, _ = store50
    h, w, c = SHAPE
    with open_store(path) as s:
        mean, std = s.stats()
        rows = s.read_rows("train", np.arange(50))
    mirrored = rows.reshape(50, h, w, c)[:, :, ::-1].reshape(50, -1)
    flips = 0
    with Loader(path, "train", 10, augment="flip", seed=8) as L, \
            Loader(path, "train", 10, augment="flip", seed=8, standardize=True) as S:
        for _ in range(4):
            for (X, _), (Z, _) in zip(L, S):
                ids = L.batch_rows(L.epoch, L.position - 1)
                for j, i in enumerate(ids):
                    is_flip = np.array_equal(X[:, j], mirrored[i])
                    assert is_flip or np.array_equal(X[:, j], rows[i])
                    flips += is_flip
                want = (X.T - mean.astype(np.float32)) * (1 / std).astype(np.float32)
                assert np.array_equal(Z, want.T)
    assert 60 < flips < 140  # 200 draws with p = 1/2


def test_batches_stay_valid_through_the_next_step(store50, threaded):
    path, px, _ = store50
    for prefetch in (0, 1, 4):
        with Loader(path, "train", 5, prefetch=prefetch) as L:
            prev = None
            for X, Y in L:
                if prev is not None:
                    assert np.array_equal(prev[0], prev[1])  # previous batch still intact
                prev = (X, X.copy())


# -- errors -----------------------------------------------------------------------------------------
def one_line_error(match, fn):
    with pytest.raises(StreamnnError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_errors_are_one_line(store50, tmp_path):
    path, _, _ = store50
    one_line_error("unknown split 'nope'", lambda: Loader(path, "nope"))
    for bad in (0, -3, 2.5, True, "8"):
        one_line_error("batch size", lambda: Loader(path, "train", bad))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    one_line_error("not an HDF5 file", lambda: Loader(junk, "train"))
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["train/X"] = np.zeros((3, 60), np.float32)
    one_line_error("not a streamnn store", lambda: Loader(plain, "train"))
    one_line_error("no such store", lambda: Loader(tmp_path / "missing.h5", "train"))
    nostats = tmp_path / "nostats.h5"
    make_store(nostats, 5, stats=False)
    one_line_error("stats", lambda: Loader(nostats, "train", standardize=True))
    one_line_error("outside", lambda: Loader(path, "train", subset=[0, 50]))
    one_line_error("repeats", lambda: Loader(path, "train", subset=[1, 2, 1]))
    one_line_error("1-D", lambda: Loader(path, "train", subset=np.zeros((2, 2), int)))
    one_line_error("rank", lambda: Loader(path, "train", rank=2, world_size=2))
    one_line_error("order", lambda: Loader(path, "train", order="random"))
    one_line_error("augment", lambda: Loader(path, "train", augment="rotate"))


def test_mismatched_x_and_y_is_one_line(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, 10)
    with h5py.File(path, "a") as f:
        del f["train/y"]
        f["train/y"] = np.zeros(7, np.int32)
    one_line_error("X has 10 rows but y has 7", lambda: Loader(path, "train"))


def test_store_replaced_after_the_loader_was_made(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, 20)
    L = Loader(path, "train", 4)
    make_store(path, 20, seed=5)  # same path, other content
    one_line_error("changed since the loader was made", lambda: next(iter(L)))
    L.close()


def test_two_loops_at_once_is_an_error(store50):
    path, _, _ = store50
    with Loader(path, "train", 5) as L:
        first = iter(L)
        next(first)
        next(iter(L))
        one_line_error("one loop at a time", lambda: next(first))


# -- processes --------------------------------------------------------------------------------------
def _in_child(method: str, target, arg):
    """What ``target(arg, queue)`` puts on the queue, run in a child process started by ``method``."""
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=target, args=(arg, queue))
    child.start()
    try:
        got = queue.get(timeout=120)
    finally:
        child.join(timeout=60)
        if child.exitcode is None:  # hung: never left behind (multiprocessing joins it at exit)
            child.kill()
            child.join()
    assert child.exitcode == 0
    return got


def _rest_of_epoch(loader, queue):
    ids = []
    for X, _ in loader:
        p = np.rint(X[ID:ID + 2] * 255).astype(np.int64)
        ids += (p[0] + 256 * p[1]).tolist()
    queue.put((ids, loader.epoch))


@pytest.mark.parametrize("method,compression", [("fork", None), ("fork", "lzf"), ("spawn", None), ("spawn", "lzf"),
                                                ("forkserver", None)])
def test_loader_in_a_child_process(tmp_path, threaded, method, compression):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {method!r} does not exist on this platform (Windows has spawn only)")
    path = tmp_path / "s.h5"
    px, _ = make_store(path, 60, "uint8", compression)
    with Loader(path, "train", 7, seed=4, prefetch=2) as L:
        it = iter(L)
        next(it)
        expected = (sum((row_ids(X, px) for X, _ in it), []), 1)
    with Loader(path, "train", 7, seed=4, prefetch=2) as L:
        next(iter(L))  # the parent has opened its reader (and started its prefetch thread)
        got = _in_child(method, _rest_of_epoch, L)  # fork: inherited, else pickled
        assert tuple(got) == expected
        assert sum(epoch_rows(L, px), []) == expected[0]  # the parent carries on untouched


def _continue_loop(it, queue):
    queue.put(sum((row_ids(X, PX60) for X, _ in it), []))


def test_forked_child_continues_a_running_loop(tmp_path, threaded):
    global PX60
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("start method 'fork' does not exist on this platform (Windows)")
    path = tmp_path / "s.h5"
    PX60, _ = make_store(path, 60, "uint8")
    with Loader(path, "train", 7, seed=4) as L:
        it = iter(L)
        next(it)
        got = _in_child("fork", _continue_loop, it)  # the parent's prefetches are pending
        assert got == sum((row_ids(X, PX60) for X, _ in it), [])
        L.close()
        assert sum(epoch_rows(L, PX60), []) != got  # the next epoch (reopened after close)


PX60 = None


# -- memory -----------------------------------------------------------------------------------------
def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize("compression", [None, "lzf"])
def test_memory_stays_bounded_on_a_big_store(tmp_path, threaded, compression):
    shape = (32, 32, 3)
    d = int(np.prod(shape))
    n = 5500 if compression is None else 4000  # 68 MB / 49 MB of float32 rows
    path = tmp_path / "big.h5"
    make_store(path, n, "float32", compression, shape=shape, stats=False)
    batch, prefetch, window = 64, 2, 4
    buffers = (prefetch + 2) * batch * d * 4
    band_cache = 0 if compression is None else (window + 2) * (1 << 20)
    rss = _rss_anon()
    tracemalloc.start()
    try:
        with Loader(path, "train", batch, prefetch=prefetch, seed=1, window_blocks=window,
                    order="block" if compression else "exact", augment="flip") as L:
            total = 0.0
            for _ in range(2):
                for X, _ in L:
                    total += float(X[0, 0])
            mode = L.reader_mode
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = _rss_anon() - rss
    assert mode == ("chunks" if compression else "memmap")
    # X ring + flip scratch + staging + indices + (compressed) the decompressed chunk cache.
    assert peak < buffers + band_cache + 3 * (1 << 20), (peak, buffers, band_cache)
    assert peak < n * d * 4 / 3 and grown < n * d * 4 / 2, (peak, grown)
