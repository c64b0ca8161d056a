"""streamnn.torch: the Loader's batches under torch's DataLoader (workers, ranks, resume, conventions)."""
from __future__ import annotations

import json
import multiprocessing
import pickle
import socket
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_loader import SHAPE, D, make_store, row_ids  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from streamnn import StreamnnError  # noqa: E402
from streamnn.data.loader import Loader  # noqa: E402
from streamnn.torch import IGNORE_INDEX, StoreBatches, StoreDataset  # noqa: E402

H, W, C = SHAPE


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "s.h5"
    px, labels = make_store(path, 50, dtype="uint8")
    return path, px, labels


def as_loader_x(x):
    """A (b, H, W, C) BGR float32 batch as the Loader's X (D, b)."""
    return x.numpy().reshape(len(x), D).T


def round_robin(gens):
    """What DataLoader hands out from its workers' iterators (in order, skipping exhausted ones)."""
    gens, out = list(gens), []
    while gens:
        for g in list(gens):
            try:
                out.append(next(g))
            except StopIteration:
                gens.remove(g)
    return out


def rank_batches(ds, workers):
    return list(ds) if workers == 0 else round_robin(ds.shard(w, workers) for w in range(workers))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2, 4])
def test_ranks_and_workers_give_the_loaders_batches(store, world, workers):
    path, px, labels = store
    kw = dict(batch_size=8, seed=3, augment="flip,shift=1/reflect", shuffle=True)
    seen, counts = Counter(), set()
    for epoch in (0, 1):
        for rank in range(world):
            ds = StoreBatches(path, "train", rank=rank, world_size=world, layout="NHWC", channels="BGR", **kw)
            ds.set_epoch(epoch)
            got = rank_batches(ds, workers)
            loader = Loader(path, "train", rank=rank, world_size=world, prefetch=0, **kw)
            loader.epoch = epoch
            want = [(X.copy(), Y.copy()) for X, Y in loader]
            counts.add(len(got))
            assert len(got) == len(want) == len(ds) == 7
            for (x, y), (X, Y) in zip(got, want):
                assert x.dtype == torch.float32 and y.dtype == torch.int64
                np.testing.assert_array_equal(as_loader_x(x), X)  # same rows, flips and shifts, bit for bit
                np.testing.assert_array_equal(y.numpy(), Y.reshape(-1).astype(np.int64))
            if epoch == 0:
                unaugmented = StoreBatches(path, "train", rank=rank, world_size=world, layout="NHWC",
                                           channels="BGR", batch_size=8, seed=3)
                for x, _ in rank_batches(unaugmented, workers):
                    seen.update(row_ids(as_loader_x(x), px))
    assert counts == {7}  # the same number of batches on every rank, whatever the workers
    assert seen == Counter(range(50))  # every row exactly once per epoch over ranks x workers


@pytest.mark.parametrize("last", ["keep", "drop", "pad"])
def test_last_batch_policies(store, last):
    path, px, labels = store
    world, rows, shapes = 3, Counter(), set()
    for rank in range(world):
        ds = StoreBatches(path, "train", batch_size=8, rank=rank, world_size=world, last=last, layout="NHWC",
                          channels="BGR")
        for x, y in ds:
            shapes.add(len(x))
            real = y != IGNORE_INDEX
            rows.update(row_ids(as_loader_x(x[real]), px))
            assert not x[~real].any() and len(x) == len(y)
    if last == "drop":
        assert len(rows) == 48 and set(rows.values()) == {1} and shapes == {3, 2}  # 8 = 3 + 3 + 2
    elif last == "pad":
        assert rows == Counter(range(50)) and shapes == {3}  # fixed shapes, padded rows labelled -100
    else:
        assert rows == Counter(range(50)) and shapes == {3, 2, 1, 0}  # the last batch of 2 rows: 1, 1, 0


def test_conventions(store):
    path, px, labels = store
    kw = dict(batch_size=5, shuffle=False)
    x, y = next(iter(StoreBatches(path, "train", **kw)))
    imgs = px[:5].reshape(5, H, W, C)
    assert x.shape == (5, C, H, W) and x.dtype == torch.float32 and x.is_contiguous()
    np.testing.assert_allclose(x.numpy(), imgs[..., ::-1].transpose(0, 3, 1, 2) / 255, rtol=1e-6)  # RGB
    assert y.dtype == torch.int64 and y.tolist() == labels[:5].tolist()
    u, _ = next(iter(StoreBatches(path, "train", dtype=torch.uint8, layout="NHWC", channels="BGR", **kw)))
    assert u.dtype == torch.uint8 and np.array_equal(u.numpy(), imgs)
    cl, _ = next(iter(StoreBatches(path, "train", layout="channels_last", **kw)))
    assert cl.shape == (5, C, H, W) and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, x)
    s, _ = next(iter(StoreBatches(path, "train", standardize=True, **kw)))
    loader = Loader(path, "train", standardize=True, **kw)
    X, _ = next(iter(loader))
    np.testing.assert_array_equal(s.numpy()[:, ::-1].transpose(0, 2, 3, 1).reshape(5, D), X.T)
    for bad in (dict(layout="CHW"), dict(channels="GBR"), dict(dtype="float64"), dict(last="wrap"),
                dict(standardize=True, dtype="uint8")):
        with pytest.raises(StreamnnError):
            StoreBatches(path, "train", **bad)


def test_pickles_only_settings_and_position(store):
    path, _, _ = store
    ds = StoreBatches(path, "train", batch_size=8)
    next(iter(ds))  # opens a reader in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 3000 and b"h5py" not in blob
    copy = pickle.loads(blob)
    assert copy.position == 1 and torch.equal(next(iter(copy))[0], list(StoreBatches(path, "train", batch_size=8))[1][0])


def test_real_workers_two_epochs_and_resume_with_other_workers(store):
    path, px, _ = store
    kw = dict(batch_size=8, seed=5, layout="NHWC", channels="BGR")
    want = [[row_ids(as_loader_x(x), px) for x, _ in StoreBatches(path, "train", **kw).shard(0, 1)]]
    ref = StoreBatches(path, "train", **kw)
    ref.set_epoch(1)
    want.append([row_ids(as_loader_x(x), px) for x, _ in ref])

    ds = StoreBatches(path, "train", **kw)
    dl = ds.dataloader(num_workers=2)
    assert len(dl) == 7
    got = [[row_ids(as_loader_x(x), px) for x, _ in dl]]
    assert ds.epoch == 1 and ds.position == 0  # the epoch ended: the next loop is epoch 1
    first = []
    for x, _ in dl:
        first.append(row_ids(as_loader_x(x), px))
        if len(first) == 3:
            break
    state = ds.state_dict()
    assert (state["epoch"], state["position"], state["samples"]) == (1, 3, 24)
    resumed = StoreBatches(path, "train", **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = [row_ids(as_loader_x(x), px) for x, _ in resumed.dataloader(num_workers=1)]  # 1 worker now
    got.append(first + rest)
    assert got == want
    with pytest.raises(StreamnnError, match="in_order"):
        ds.dataloader(num_workers=1, in_order=False)


@pytest.mark.parametrize("batch_size, group", [(4, 1), (2, 2)])
def test_the_ring_lends_slots_only_while_unreferenced_and_falls_back_when_all_are_held(store, monkeypatch,
                                                                                      batch_size, group):
    path, px, _ = store
    monkeypatch.setattr("streamnn.torch.ring.MAX_GROUP", group)  # batches per DataLoader item
    kw = dict(batch_size=batch_size, seed=7, augment="flip,shift=1/zero", dtype=torch.uint8)  # lent as they are
    want = list(StoreBatches(path, "train", **kw))  # in this process (13 or 25 batches, NCHW RGB uint8)
    ds = StoreBatches(path, "train", **kw)
    dl = ds.dataloader(num_workers=2, prefetch_factor=1)  # 2 x group + 3 slots a worker: keeping all exhausts them
    kept = list(dl)
    assert len(kept) == len(want) and all(torch.equal(x, w[0]) and torch.equal(y, w[1])
                                          for (x, y), w in zip(kept, want))
    ring = dl.ring
    assert ring.group == group and ring.slots == 2 * group + 3 and 2 * ring.slots < len(want)
    assert len(ring.lent) == 2 * ring.slots and (ring.state == 1).all()  # all lent: the rest came as fresh tensors
    view = kept[0][0][1:]  # a view keeps its slot lent
    del kept
    assert ring.lent == {(0, 0)}
    del view
    assert not ring.lent and (ring.state == 0).all()
    for epoch in (1, 2):  # the next loops reuse the slots: batches dropped as they come
        ref = StoreBatches(path, "train", **kw)
        ref.set_epoch(epoch)
        assert all(torch.equal(x, w[0]) for (x, _), w in zip(dl, ref)) and ds.epoch == epoch + 1
        assert not ring.lent


@pytest.mark.parametrize("last", ["keep", "pad"])
def test_float_batches_of_a_uint8_store_travel_as_bytes_and_are_scaled_by_the_caller(store, last):
    """Workers hand over the stored bytes (augmented, erased); the main process scales them into
    buffers of its own, reused only once nothing references a batch: the same tensors as in one
    process, kept batches intact, every slot free once a batch is taken."""
    path, _, _ = store
    kw = dict(batch_size=4, seed=7, augment="flip,shift=1/zero,erase=0.9", last=last)
    want = list(StoreBatches(path, "train", **kw))
    ds = StoreBatches(path, "train", **kw)
    dl = ds.dataloader(num_workers=2)
    kept = list(dl)  # all kept: four buffers of this process, then fresh arrays
    assert dl.ring.dtype == "uint8" and not dl.ring.lent and (dl.ring.state == 0).all()
    assert len(kept) == len(want) and all(x.dtype == torch.float32 and torch.equal(x, w[0]) and torch.equal(y, w[1])
                                          for (x, y), w in zip(kept, want))
    assert len({x.data_ptr() for x, _ in kept}) == len(kept)
    ref = StoreBatches(path, "train", **kw)
    ref.set_epoch(1)
    assert all(torch.equal(x, w[0]) for (x, _), w in zip(dl, ref))  # dropped as they come


def test_in_place_batches_reuse_a_buffer_only_once_nothing_references_it(store):
    path, _, _ = store
    kw = dict(batch_size=4, seed=7, augment="flip")
    ds = StoreBatches(path, "train", layout="NHWC", channels="BGR", **kw)  # the Loader's pixels, unturned
    with Loader(path, "train", **kw) as L:
        want = [[X.copy() for X, _ in L] for _ in range(2)]
    kept = list(ds)  # every batch kept: the buffers, then fresh tensors, none overwritten
    assert len({x.data_ptr() for x, _ in kept}) == len(kept) == 13
    assert all(np.array_equal(as_loader_x(x), w) for (x, _), w in zip(kept, want[0]))
    view = kept[0][0][1:]
    del kept
    seen = []
    for x, _ in ds:  # dropped as they come: a few buffers serve the epoch (not the one still viewed)
        seen.append((x.data_ptr(), as_loader_x(x).copy()))
    assert all(np.array_equal(got, w) for (_, got), w in zip(seen, want[1]))
    ptrs = {p for p, _ in seen}
    assert len(ptrs) <= 3 and view.data_ptr() - view.element_size() * view[0].numel() not in ptrs


def test_persistent_workers_of_a_plain_dataloader_follow_set_epoch_and_refuse_other_settings(store):
    path, px, _ = store
    kw = dict(batch_size=8, seed=3, layout="NHWC", channels="BGR")
    ds = StoreBatches(path, "train", **kw)
    dl = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        loader = Loader(path, "train", batch_size=8, seed=3)
        loader.epoch = epoch
        assert [row_ids(as_loader_x(x), px) for x, _ in dl] == [row_ids(X, px) for X, _ in loader]
    other = Loader(path, "train", batch_size=8, seed=4)
    ds.load_state_dict(other.state_dict())  # another seed: the running workers cannot follow
    with pytest.raises(StreamnnError, match="make a new DataLoader"):
        list(dl)
    counted = ds.dataloader(num_workers=1)  # dataloader() remakes its workers by itself
    assert [row_ids(as_loader_x(x), px) for x, _ in counted] == [row_ids(X, px) for X, _ in other]


def test_resume_on_another_number_of_ranks(store):
    path, px, _ = store
    kw = dict(batch_size=6, seed=2, layout="NHWC", channels="BGR", augment="flip")
    full = [as_loader_x(x) for x, _ in StoreBatches(path, "train", **kw)]
    two = [StoreBatches(path, "train", rank=r, world_size=2, **kw) for r in range(2)]
    its = [iter(d) for d in two]
    for _ in range(4):
        for it in its:
            next(it)
    state = two[0].state_dict()
    for world in (1, 3):
        parts = []
        for r in range(world):
            d = StoreBatches(path, "train", rank=r, world_size=world, **kw)
            d.load_state_dict(state)
            parts.append([as_loader_x(x) for x, _ in round_robin(d.shard(w, 2) for w in range(2))])
        for k, batch in enumerate(full[4:]):
            joined = np.empty_like(batch)
            for r in range(world):
                joined[:, r::world] = parts[r][k]
            np.testing.assert_array_equal(joined, batch)


def test_store_dataset_with_a_distributed_sampler(store, monkeypatch):
    path, px, labels = store
    ds = StoreDataset(path, "train", layout="NHWC", channels="BGR", dtype="uint8")
    assert len(ds) == 50
    x, y = ds[7]
    assert np.array_equal(x.numpy().reshape(-1), px[7]) and int(y) == labels[7] and y.dtype == torch.int64
    calls = []
    real = StoreDataset.__getitems__
    monkeypatch.setattr(StoreDataset, "__getitems__", lambda self, idx: calls.append(len(idx)) or real(self, idx))
    seen = Counter()
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        sampler.set_epoch(3)
        for xb, yb in DataLoader(ds, batch_size=10, sampler=sampler):
            ids = [int(np.flatnonzero((px == r.numpy().reshape(-1)).all(1))[0]) for r in xb]
            assert yb.tolist() == labels[ids].tolist()
            seen.update(ids)
    assert seen == Counter(range(50)) and calls == [10, 10, 5] * 2  # one read per batch
    with pytest.raises(IndexError):
        ds[50]
    rgb = StoreDataset(path, "train", standardize=True)
    assert rgb[0][0].shape == (C, H, W)
    assert pickle.loads(pickle.dumps(rgb))[3][0].shape == (C, H, W)


def test_the_core_never_imports_torch():
    code = ("import sys, streamnn, streamnn.data.loader, streamnn.run.trainer, streamnn.cli.train, streamnn.pack\n"
            "from streamnn import Loader, open_store, ConvNet\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def _gloo_rank(path, port, rank, out):
    """One rank of a real torch.distributed (gloo) run: the row numbers of its batches, two epochs."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ds = StoreBatches(path, "train", batch_size=8, seed=4, layout="NHWC", channels="BGR", dtype="uint8")
    assert (ds.rank, ds.world_size) == (rank, 2)
    rows = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        batches = []
        for x, y in ds.dataloader(num_workers=0):
            n = torch.tensor([len(x)])
            dist.all_reduce(n)  # one collective per batch: unequal batch counts would deadlock
            p = x.reshape(len(x), -1).to(torch.int64)
            batches.append([int(v) for v in (p[:, 6] + 256 * p[:, 7])])  # the row number's two pixels
        rows.append(batches)
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(rows, f)


def test_torch_distributed_gloo_two_processes(store, tmp_path):
    path, px, _ = store
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")  # torch is imported already: forking saves two imports
    procs = [ctx.Process(target=_gloo_rank, args=(path, port, r, tmp_path / f"{r}.json")) for r in range(2)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
    finally:  # a rank that hangs is killed, never left behind (multiprocessing joins it at exit)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        a, b = got[0][epoch], got[1][epoch]
        assert len(a) == len(b) == 7
        assert Counter(sum(a, []) + sum(b, [])) == Counter(range(50))
        loader = Loader(path, "train", batch_size=8, seed=4)
        loader.epoch = epoch
        for k, (X, _) in enumerate(loader):  # rank shares interleave to the one-process batch
            ids = row_ids(X, px)
            assert ids[0::2] == a[k] and ids[1::2] == b[k]
    assert got[0][0] != got[0][1]


def test_the_pytorch_example_of_the_docs_runs(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path
    page = (Path(__file__).resolve().parent.parent / "docs" / "frameworks.md").read_text()
    code = re.search(r"## PyTorch\n.*?```python\n(.*?)```", page, flags=re.S).group(1)
    make_store(tmp_path / "demo.h5", 70, dtype="uint8")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "frameworks.md", "exec"), {})
    lines = capsys.readouterr().out.split()
    assert lines[0::2] == ["0", "1"] and all(np.isfinite(float(v)) for v in lines[1::2])
    saved = torch.load(tmp_path / "checkpoint.pt")
    assert saved["data"]["epoch"] == 2 and saved["data"]["position"] == 0
    again = StoreBatches(tmp_path / "demo.h5", "train", batch_size=32)
    again.load_state_dict(saved["data"])
    assert (again.epoch, again.position) == (2, 0)


def test_a_stateful_dataloader_resumes_exactly_mid_epoch_with_the_same_or_another_number_of_workers(store):
    from torchdata.stateful_dataloader import StatefulDataLoader
    path, px, _ = store
    kw = dict(batch_size=4, seed=9, augment="flip", layout="NHWC", channels="BGR")
    want = [row_ids(as_loader_x(x), px) for x, _ in StoreBatches(path, "train", **kw)]  # 13 batches
    for workers, then in ((2, 2), (2, 0), (0, 2)):
        sdl = StatefulDataLoader(StoreBatches(path, "train", **kw), batch_size=None, num_workers=workers)
        got = []
        for x, _ in sdl:
            got.append(row_ids(as_loader_x(x), px))
            if len(got) == 5:
                break
        state = json.loads(json.dumps(sdl.state_dict()))  # a checkpoint: plain data
        ds = StoreBatches(path, "train", **kw)
        if then == workers:  # the StatefulDataLoader's own resume (it needs the same number of workers)
            again = StatefulDataLoader(ds, batch_size=None, num_workers=then)
            again.load_state_dict(state)
        else:  # another number of workers: the dataset takes its place from that state
            ds.load_state_dict(state)
            assert (ds.epoch, ds.position) == (0, 5)
            again = StatefulDataLoader(ds, batch_size=None, num_workers=then)
        assert got + [row_ids(as_loader_x(x), px) for x, _ in again] == want, (workers, then)


OPENCV_WORKERS = """
import sys
import cv2, numpy as np, torch
from streamnn.torch import StoreBatches

class Probe(StoreBatches):
    def _to_ring(self, worker, *args):
        self.seen[worker] = cv2.getNumThreads()  # the worker's OpenCV threads as it makes batches
        yield from super()._to_ring(worker, *args)

if __name__ == "__main__":
    path, method, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cv2.setNumThreads(2)
    big = np.zeros((3000, 3000), np.uint8)
    cv2.multiply(big, 1.0, scale=0.5, dtype=cv2.CV_32F)  # OpenCV's pool has run in this process
    ds = Probe(path, "train", batch_size=4, seed=5, augment="flip")
    ds.seen = torch.zeros(workers, dtype=torch.int64).share_memory_()
    want = [x.clone() for x, _ in StoreBatches(path, "train", batch_size=4, seed=5, augment="flip")]
    got = list(ds.dataloader(num_workers=workers, multiprocessing_context=method))
    assert len(got) == len(want) and all(torch.equal(x, w) for (x, _), w in zip(got, want))
    print(ds.seen.tolist(), cv2.getNumThreads())
"""


@pytest.mark.parametrize("method, workers", [("fork", 2), ("spawn", 1)])
def test_dataloader_workers_run_opencv_on_one_thread_and_never_hang(store, tmp_path, method, workers):
    """Workers forked after OpenCV's pool ran in the parent (resizing the pool there hangs) or
    spawned: each makes its batches on one OpenCV thread, and the parent keeps its own setting."""
    path, _, _ = store
    script = tmp_path / "probe.py"
    script.write_text(OPENCV_WORKERS)
    try:
        run = subprocess.run([sys.executable, str(script), str(path), method, str(workers)], capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the DataLoader's {method} workers hung")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[0] == f"{[1] * workers} 2"
