"""Where X lies in a store file: new stores page-aligned (``x_alignment``), old ones as they were."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from imagetree import make_tree
from streamnn import StoreWriter, StreamnnError, open_store
from streamnn.cli.info import main as info
from streamnn.data.format import STORE_DTYPES, X_ALIGNMENT
from streamnn.data.readers import open_rows
from streamnn.pack.sharded import pack_sharded

FIXTURES = Path(__file__).parent / "fixtures" / "release-0.1.0"


def write(path: Path, shape: tuple[int, int, int], dtype: str = "uint8", rows: int = 10, capacity: int | None = None,
          compression: str | None = None, seed: int = 0) -> np.ndarray:
    """A store of ``rows`` random train rows (and 3 test rows); returns the train pixels."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (rows, *shape), dtype=np.uint8)
    with StoreWriter(path, class_names=["a", "b"], image_shape=shape, dtype=dtype, compression=compression,
                     channel_order="GRAY" if shape[2] == 1 else "BGR") as w:
        w.add_split("train", rows if capacity is None else capacity)
        w.write_rows("train", pixels, np.arange(rows) % 2, [f"{i}.jpg" for i in range(rows)])
        w.add_split("test", 3)
        w.write_rows("test", rng.integers(0, 256, (3, *shape), dtype=np.uint8), [0, 1, 0], ["t0", "t1", "t2"])
        w.commit()
    return pixels


def x_offset(path: Path, split: str = "train") -> int:
    with h5py.File(path, "r") as f:
        return int(f[split]["X"].id.get_offset())


@pytest.mark.parametrize("shape, dtype", [((64, 64, 3), "uint8"), ((64, 64, 3), "float32"), ((64, 64, 1), "uint8"),
                                          ((32, 32, 1), "float32"), ((32, 64, 1), "float16")])
def test_rows_of_whole_pages_start_on_pages(tmp_path, shape, dtype):
    path = tmp_path / "s.h5"
    write(path, shape, dtype, rows=7, capacity=9)  # compacted on commit: a second file, aligned too
    row_bytes = int(np.prod(shape)) * np.dtype(STORE_DTYPES[dtype]).itemsize
    assert row_bytes % X_ALIGNMENT == 0
    for split, n in (("train", 7), ("test", 3)):
        offset = x_offset(path, split)
        assert all((offset + r * row_bytes) % X_ALIGNMENT == 0 for r in range(n)), (split, offset)
    with open_store(path) as s:
        assert s.x_alignment == X_ALIGNMENT
        layout = s.layout("train")
        assert layout == {"storage": "contiguous", "row_bytes": row_bytes, "offsets": [x_offset(path)],
                          "start_aligned": True, "page_aligned": True}


def test_compressed_chunks_start_on_pages(tmp_path):
    path = tmp_path / "c.h5"
    write(path, (64, 64, 3), "uint8", rows=200, compression="lzf")
    with h5py.File(path, "r") as f:
        dset = f["train/X"]
        chunks = [dset.id.get_chunk_info(i) for i in range(dset.id.get_num_chunks())]
    assert len(chunks) >= 2
    assert all(c.byte_offset % X_ALIGNMENT == 0 for c in chunks if c.size >= X_ALIGNMENT)
    with open_store(path) as s:
        assert s.layout("train")["storage"] == "chunked" and not s.layout("train")["page_aligned"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 24), w=st.integers(1, 24), channels=st.sampled_from([1, 3]),
       dtype=st.sampled_from(sorted(STORE_DTYPES)), rows=st.integers(1, 120), spare=st.integers(0, 3))
def test_any_store_x_starts_on_a_page_and_reads_back(tmp_path, h, w, channels, dtype, rows, spare):
    """X of at least a page starts on one (HDF5 aligns objects of at least X_ALIGNMENT bytes),
    whatever the row size, and every reader reads back the rows written."""
    path = tmp_path / f"p-{h}-{w}-{channels}-{dtype}-{rows}-{spare}.h5"
    pixels = write(path, (h, w, channels), dtype, rows=rows, capacity=rows + spare)
    row_bytes = h * w * channels * np.dtype(STORE_DTYPES[dtype]).itemsize
    if rows * row_bytes >= X_ALIGNMENT:
        assert x_offset(path) % X_ALIGNMENT == 0
    with open_store(path) as s:
        assert s.layout("train")["start_aligned"]
        assert s.layout("train")["page_aligned"] == (row_bytes % X_ALIGNMENT == 0)
        expected = s.read_rows("train", np.arange(rows))
    stored = pixels.reshape(rows, -1).astype(np.float32) * np.float32(1 / 255)
    if dtype == "uint8":
        assert np.array_equal(expected, stored)
    order = np.random.default_rng(rows).permutation(rows)
    for reader in ("mmap", "pread"):
        r = open_rows(path, "train", reader=reader)
        try:
            out = np.empty((rows, h * w * channels), np.float32)
            got = r.read(order, out)
            assert r.mode == {"mmap": "memmap", "pread": "pread"}[reader]
            assert np.array_equal(got, expected[order])
        finally:
            r.close()


@pytest.mark.parametrize("name", ["store.h5", "store-u8.h5", "sharded.h5"])
def test_release_stores_keep_their_layout(tmp_path, name):
    """Stores of 0.1.0 have no x_alignment and X off the page grid: reported as such, still read."""
    with open_store(FIXTURES / name) as s:
        assert s.x_alignment is None
        layout = s.layout("train")
        assert not layout["start_aligned"] and not layout["page_aligned"]
        assert layout["storage"] == ("virtual" if name == "sharded.h5" else "contiguous")
        assert len(layout["offsets"]) == len(s.shards or [1])
        assert all(o % X_ALIGNMENT for o in layout["offsets"])
    result = CliRunner().invoke(info, [str(FIXTURES / name)])
    assert result.exit_code == 0, result.output
    assert "not page-aligned (packed before streamnn aligned X" in result.output


def test_sharded_store_shards_are_aligned(tmp_path):
    src = tmp_path / "src"
    make_tree(src, {"training_set": {"cats": 5, "dogs": 4}, "test_set": {"cats": 1, "dogs": 1}})
    out = tmp_path / "s.h5"
    pack_sharded(src, out, shards=2, size=(64, 64), dtype="uint8", workers=1, seed=0)
    with open_store(out) as s:
        assert s.x_alignment == X_ALIGNMENT
        layout = s.layout("train")
        assert layout["storage"] == "virtual" and layout["page_aligned"] and len(layout["offsets"]) == 2
        for shard in s.shards:
            assert x_offset(shard) % X_ALIGNMENT == 0
    result = CliRunner().invoke(info, [str(out)])
    assert "rows of 12,288 bytes (3 pages), each starting on a page boundary" in result.output


@pytest.mark.parametrize("value", [3, 0, -4096, "4096", 4096.0, np.array([4096, 4096])])
def test_bad_x_alignment_is_a_one_line_error(tmp_path, value):
    path = tmp_path / "s.h5"
    write(path, (4, 4, 3))
    bad = tmp_path / "bad.h5"
    shutil.copy(path, bad)
    with h5py.File(bad, "r+") as f:
        f.attrs["x_alignment"] = value
    with pytest.raises(StreamnnError, match="'x_alignment' must be a power of two"):
        open_store(bad)


@pytest.mark.parametrize("shape, dtype", [((64, 64, 3), "float32"), ((32, 32, 3), "uint8")])
@pytest.mark.parametrize("reuse", [False, True])
def test_batch_buffers_start_on_pages(tmp_path, shape, dtype, reuse):
    """The loader's X buffers and the reader's staging buffer (rows gathered by np.take, then
    cast) start on a page, as the rows of an aligned store do (a row copy between addresses 16
    bytes apart within a page is up to 2x slower)."""
    path = tmp_path / "s.h5"
    write(path, shape, dtype, rows=20)
    from streamnn.data.loader import Loader

    with Loader(path, "train", 4, reuse_buffers=reuse, prefetch=0) as loader:
        kept = [X for X, _ in loader]  # safe batches: new buffers replace the kept ones
        maker = loader._maker
        assert all(X.T.ctypes.data % X_ALIGNMENT == 0 for X in kept)
        assert all(b.ctypes.data % X_ALIGNMENT == 0 for b in maker._buffers)
        if dtype == "uint8":
            assert maker.reader._stage.ctypes.data % X_ALIGNMENT == 0
        if not reuse:
            assert len({X.T.ctypes.data for X in kept}) == len(kept)
