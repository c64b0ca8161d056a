"""streamnn.data.rows: a split's rows by index, read in whichever process asks; what the adapters build on."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from test_loader import make_store

from streamnn.data.rows import SplitRows
from streamnn.grain import StoreSource


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("r") / "s.h5"
    px, labels = make_store(path, 20, dtype="uint8")
    return path, px, labels


@pytest.mark.parametrize("reader", ["mmap", "pread"])
def test_read_gives_owned_normalized_rows_and_labels(store, reader):
    path, px, labels = store
    rows = SplitRows(path, "train", reader=reader)
    assert len(rows) == rows.n_rows == 20 and rows.class_names == ["cats", "dogs"]
    X, y = rows.read([3, 0, 3])
    assert X.dtype == np.float32 and X.flags.writeable and X.flags.owndata and y.dtype == np.int64
    np.testing.assert_allclose(X, px[[3, 0, 3]] / 255, rtol=1e-6)
    assert y.tolist() == labels[[3, 0, 3]].tolist()
    X[:] = -1  # the caller's to change: the next read is untouched
    np.testing.assert_allclose(rows.read([3])[0], px[[3]] / 255, rtol=1e-6)
    rows.close()
    assert rows.read([19])[1].tolist() == [labels[19]]  # opened again after close
    rows.close()


def test_a_lent_buffer_is_copied(store, monkeypatch):
    path, px, _ = store
    rows = SplitRows(path, "train")
    reader, _ = rows._open()
    lent = np.zeros((1, px.shape[1]), np.float32)
    monkeypatch.setattr(reader, "read", lambda r, out: lent)  # a reader returning its own buffer
    X, _ = rows.read([5])
    assert X is not lent and not np.shares_memory(X, lent) and np.array_equal(X, lent)


@pytest.mark.parametrize("bad", [[20], [-1], [0, 25]])
def test_rows_out_of_range_are_an_index_error(store, bad):
    rows = SplitRows(store[0], "train")
    with pytest.raises(IndexError, match=r"row -?\d+ out of range 0\.\.19 of split 'train'"):
        rows.read(bad)


def test_pickles_only_settings(store):
    path, px, _ = store
    rows = SplitRows(path, "train")
    rows.read([1])
    blob = pickle.dumps(rows)
    assert len(blob) < 1000 and b"h5py" not in blob
    copy = pickle.loads(blob)
    assert copy._reader is None and copy._labels is None
    np.testing.assert_allclose(copy.read([1])[0], px[[1]] / 255, rtol=1e-6)


def test_store_source_closes_its_reader(store):
    path, px, labels = store
    src = StoreSource(path, "train", channels="BGR", dtype="uint8")
    assert src[2]["label"].dtype == np.int32 and src.split_rows == 20
    src.close()
    assert src._reader is None and np.array_equal(src[2]["image"].reshape(-1), px[2])
