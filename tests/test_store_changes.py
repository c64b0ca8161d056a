"""A store that changes under a running loader (truncated, rewritten in place, replaced by a rename,
deleted): the next batch is a one-line StreamnnError naming the file, never a SIGBUS death (memory
map) and never other pixels under the old labels (pread, h5py readers); plain and sharded stores."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from streamnn import StoreWriter, StreamnnError, open_store
from streamnn.data.loader import Loader
from streamnn.data.readers import open_rows

SHAPE = (8, 8, 3)
ROWS = 40


def make(path: Path, seed: int, compression: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    with StoreWriter(path, class_names=["a", "b"], image_shape=SHAPE, compression=compression) as w:
        for split, n in (("train", ROWS), ("test", 6)):
            w.add_split(split, n)
            w.write_rows(split, rng.integers(0, 255, (n, *SHAPE)).astype(np.uint8), np.arange(n) % 2,
                         [f"{split}/{i}.jpg" for i in range(n)])
        w.commit()
    old = time.time() - 3600  # the change below is then a later modification time, whatever the clock's grain
    os.utime(path, (old, old))
    return path


def make_sharded(path: Path, seed: int) -> Path:
    from imagetree import make_tree
    from streamnn.pack.sharded import pack_sharded
    src = path.parent / f"src{seed}"
    make_tree(src, {"training_set": {"cats": 12, "dogs": 12}, "test_set": {"cats": 2, "dogs": 2}})
    pack_sharded(src, path, shards=2, size=(6, 8), workers=1, seed=seed)
    with open_store(path) as store:
        for p in [path, *store.shards]:
            os.utime(p, (time.time() - 3600,) * 2)
    return path


def change(victim: Path, how: str, other: Path) -> None:
    if how == "truncate":
        os.truncate(victim, victim.stat().st_size // 2)
    elif how == "overwrite":  # same size, other bytes, in place (the same inode)
        size = victim.stat().st_size
        data = other.read_bytes()[:size]
        with open(victim, "r+b") as f:
            f.write(data + bytes(size - len(data)))
        assert victim.stat().st_size == size
    elif how == "replace":  # a repack: another file renamed over it
        tmp = victim.with_name("new.tmp")
        tmp.write_bytes(other.read_bytes())
        os.replace(tmp, victim)
    elif how == "delete":
        victim.unlink()
    else:
        raise AssertionError(how)


def victims(path: Path) -> list[Path]:
    """The files whose rows the loader reads: the store, or a sharded store's shards."""
    with open_store(path) as store:
        return list(store.shards) or [path]


HOWS = ["truncate", "overwrite", "replace", "delete"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("reader", ["mmap", "pread", "chunks"])
def test_one_file_store_changed_between_batches(tmp_path, reader, how):
    compression = "gzip" if reader == "chunks" else None
    path, other = make(tmp_path / "s.h5", 0, compression), make(tmp_path / "o.h5", 1, compression)
    with Loader(path, "train", batch_size=4, prefetch=0, reader="auto" if reader == "chunks" else reader) as loader:
        assert loader.reader_mode == ("chunks" if reader == "chunks" else "memmap" if reader == "mmap" else "pread")
        batches = iter(loader)
        first = next(batches)[0].copy()
        with open_store(path) as store:
            assert np.array_equal(first.T, store.read_rows("train", loader.batch_rows(0, 0)))
        change(path, how, other)
        with pytest.raises(StreamnnError, match=re.escape(str(path)) + ": the store changed while it was being read"):
            next(batches)


@pytest.mark.parametrize("how", ["truncate", "overwrite", "replace"])
@pytest.mark.parametrize("reader", ["mmap", "pread"])
def test_sharded_store_changed_between_batches(tmp_path, reader, how):
    path, other = make_sharded(tmp_path / "s.h5", 4), make_sharded(tmp_path / "o.h5", 5)
    with Loader(path, "train", batch_size=4, prefetch=0, reader=reader) as loader:
        batches = iter(loader)
        next(batches)
        shard, twin = victims(path)[1], victims(other)[1]
        change(shard, how, twin)
        with pytest.raises(StreamnnError, match=re.escape(str(shard)) + ": the store changed"):
            next(batches)


@pytest.mark.parametrize("reader", ["mmap", "pread"])
def test_change_mid_epoch_with_prefetch_stops_before_the_epoch_ends(tmp_path, reader):
    """With the prefetch thread: batches made before the change are the old rows; the epoch
    does not end without the error."""
    path, other = make(tmp_path / "s.h5", 0), make(tmp_path / "o.h5", 1)
    with open_store(path) as store:
        rows = store.read_rows("train", np.arange(ROWS))
    seen = 0
    with Loader(path, "train", batch_size=2, reader=reader) as loader:
        loader.prefetch_policy = "thread"
        with pytest.raises(StreamnnError, match="the store changed"):
            for k, (X, _) in enumerate(loader):
                assert np.array_equal(X.T, rows[loader.batch_rows(0, k)])  # never other rows
                seen += 1
                if k == 2:
                    change(path, "overwrite", other)
    assert 3 <= seen < ROWS // 2


def test_reader_refuses_a_store_replaced_while_it_is_opened(tmp_path):
    """The reader's descriptor is checked against the file h5py read the layout from."""
    path, other = make(tmp_path / "s.h5", 0), make(tmp_path / "o.h5", 1)
    import h5py
    real = h5py.File

    def swapping(name, *args, **kwargs):  # the store is replaced just after h5py opened it
        f = real(name, *args, **kwargs)
        if Path(name) == path:
            tmp = path.with_name("x.tmp")
            tmp.write_bytes(other.read_bytes())
            os.replace(tmp, path)
        return f

    for reader in ("mmap", "pread"):
        h5py.File = swapping
        try:
            with pytest.raises(StreamnnError, match="the store changed"):
                open_rows(path, "train", reader=reader)
        finally:
            h5py.File = real
        path.write_bytes(make(tmp_path / "again.h5", 0).read_bytes())
