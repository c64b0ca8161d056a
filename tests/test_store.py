"""The store format: writer round trip, compaction, validation errors, atomicity."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from streamnn import StoreWriter, StreamnnError, open_store
from streamnn.data.format import FORMAT_VERSION

SHAPE = (4, 5, 3)


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


def write(path, dtype="float32", compression=None, capacity=None, n=10):
    px = _pixels(n)
    with StoreWriter(path, class_names=["cats", "dogs"], image_shape=SHAPE, dtype=dtype,
                     compression=compression, command="test", options={"size": [4, 5]}) as w:
        w.add_split("train", capacity or n)
        w.write_rows("train", px[:3], [0, 1, 0], ["a/0", "a/1", "a/2"])
        w.write_rows("train", px[3:], [1] * (n - 3), [f"b/{i}" for i in range(n - 3)])
        w.set_skipped([("x/.DS_Store", "not an image")])
        w.set_stats(np.full(60, 0.5), np.full(60, 0.25))
        w.commit()
    return px


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-7), ("float16", 5e-4), ("uint8", 1e-7)])
@pytest.mark.parametrize("compression", [None, "lzf"])
def test_round_trip_gives_normalized_float32(tmp_path, dtype, tol, compression):
    path = tmp_path / "s.h5"
    px = write(path, dtype, compression)
    with open_store(path) as s:
        assert s.splits == ["train"] and s.n_rows("train") == 10
        assert s.class_names == ["cats", "dogs"] and s.image_shape == SHAPE
        assert s.dtype == dtype and s.options == {"size": [4, 5]} and s.command == "test"
        rows = s.read_rows("train", [9, 0, 9, 4])
        assert rows.dtype == np.float32
        np.testing.assert_allclose(rows, px[[9, 0, 9, 4]].reshape(4, -1) / 255.0, atol=tol)
        if dtype != "float16":  # float16 keeps ~11 bits: pixels may round to a neighbour
            assert np.array_equal(s.images(rows), px[[9, 0, 9, 4]])
        assert s.labels("train").tolist() == [0, 1, 0] + [1] * 7
        assert s.paths("train")[:2] == ["a/0", "a/1"]
        assert s.counts() == {"train": {"cats": 2, "dogs": 8}}
        assert s.skipped() == [("x/.DS_Store", "not an image")]
        mean, std = s.stats()
        assert mean.shape == (60,) and float(std[0]) == 0.25
        s.verify()


def test_split_with_unused_capacity_is_compacted(tmp_path):
    path = tmp_path / "s.h5"
    px = write(path, capacity=25)
    small = tmp_path / "t.h5"
    write(small)
    with open_store(path) as s:
        assert s.n_rows("train") == 10
        np.testing.assert_allclose(s.read_rows("train", range(10)), px.reshape(10, -1) / 255.0, atol=1e-7)
        s.verify()
    assert os.path.getsize(path) <= os.path.getsize(small) + 4096
    assert sorted(os.listdir(tmp_path)) == ["s.h5", "t.h5"]


def test_contiguous_by_default_so_rows_can_be_memory_mapped(tmp_path):
    write(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["train/X"].chunks is None and f["train/X"].id.get_offset() is not None


def test_leaving_without_commit_writes_nothing(tmp_path):
    out = tmp_path / "s.h5"
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(out, class_names=["a"], image_shape=SHAPE) as w:
            w.add_split("train", 4)
            w.write_rows("train", _pixels(2), [0, 0], ["p", "q"])
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_previous_store(tmp_path):
    out = tmp_path / "s.h5"
    write(out)
    before = out.read_bytes()
    with pytest.raises(RuntimeError):
        with StoreWriter(out, class_names=["a"], image_shape=SHAPE) as w:
            w.add_split("train", 1)
            raise RuntimeError("crash")
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["s.h5"]


def _tamper(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


@pytest.mark.parametrize("tamper,message", [
    (lambda f: f.attrs.__setitem__("format", "other"), "not a streamnn store"),
    (lambda f: f.attrs.__setitem__("format_version", FORMAT_VERSION + 1), "format version"),
    (lambda f: f.attrs.__delitem__("class_names"), "'class_names' is missing"),
    (lambda f: f["train"].__delitem__("y"), "member 'train/y' must be a dataset, it is missing"),
    (lambda f: (f["train"].__delitem__("y"), f["train"].create_dataset("y", data=np.zeros(3, np.int32))),
     "X has 10 rows but y has 3"),
    (lambda f: (f["train"].__delitem__("X"), f["train"].create_dataset("X", data=np.zeros((10, 7), np.float32))),
     "expected (N, 60)"),
])
def test_inconsistent_store_gives_one_line_error(tmp_path, tamper, message):
    path = tmp_path / "s.h5"
    write(path)
    _tamper(path, tamper)
    with pytest.raises(StreamnnError) as err:
        open_store(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_not_hdf5_and_missing_file(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("hello")
    with pytest.raises(StreamnnError, match="not an HDF5 file"):
        open_store(bad)
    with pytest.raises(StreamnnError, match="no such store file"):
        open_store(tmp_path / "missing.h5")


def test_fingerprint_detects_changed_labels(tmp_path):
    path = tmp_path / "s.h5"
    write(path)
    _tamper(path, lambda f: f["train/y"].__setitem__(slice(None), np.roll(f["train/y"][...], 1)))  # same counts
    with open_store(path) as s, pytest.raises(StreamnnError, match="fingerprint"):
        s.verify()


def test_fingerprint_depends_on_content_not_time(tmp_path):
    write(tmp_path / "a.h5")
    write(tmp_path / "b.h5")
    with open_store(tmp_path / "a.h5") as a, open_store(tmp_path / "b.h5") as b:
        assert a.fingerprint == b.fingerprint
        counts = json.loads(a._file.attrs["counts"])
        assert counts == a.counts() == {"train": {"cats": 2, "dogs": 8}}


def test_unknown_split_is_a_clear_error(tmp_path):
    write(tmp_path / "s.h5")
    with open_store(tmp_path / "s.h5") as s, pytest.raises(StreamnnError, match="unknown split 'test'"):
        s.n_rows("test")
