"""Crafted but digest-valid indexes: shard paths that are absolute, escape the store's folder
('..'), or are not in normal form ('./', '//') are refused in one line by every open (info,
train, eval all open through Store / open_rows); a plain relative path into another folder is
read as the integrity check resolves it (the same rows)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imagetree import make_tree
from streamnn import StoreWriter, StreamnnError, open_store
from streamnn.data.format import plain_relative, shard_record, shard_records
from streamnn.data.loader import Loader
from streamnn.data.readers import open_rows
from streamnn.pack.sharded import pack_sharded


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("idx")
    make_tree(root / "src", {"training_set": {"cats": 6, "dogs": 6}, "test_set": {"cats": 2, "dogs": 2}})
    out = root / "store" / "s.h5"
    out.parent.mkdir()
    pack_sharded(root / "src", out, shards=2, size=(6, 8), workers=1, seed=1)
    return out


def rewrite_index(index: Path, out: Path, name_of) -> None:
    """A new index ``out`` over ``index``'s shards, each recorded (and read by its virtual
    datasets) under the name ``name_of(shard path)``: digest-valid, as a crafted index would be."""
    with open_store(index) as store:
        records = shard_records(store._file.attrs["shards"], index)
        rows = {}
        for shard in store.shards:
            with open_store(shard) as part:
                rows[shard] = {s: part.n_rows(s) for s in store.splits}
        names = {shard: name_of(shard) for shard in store.shards}
        new_records = []
        for shard, record in zip(store.shards, records):
            rec = shard_record(shard, names[shard])
            assert {k: v for k, v in rec.items() if k != "file"} == {k: v for k, v in record.items() if k != "file"}
            new_records.append(rec)
        with StoreWriter(out, class_names=store.class_names, image_shape=store.image_shape, dtype=store.dtype,
                         channel_order=store.channel_order, options=store.options) as w:
            for split in sorted(store.splits):
                w.add_virtual_split(split, [(names[s], rows[s][split]) for s in store.shards])
            stats = store.stats()
            if stats is not None:
                w.set_stats(*stats)
            w.set_skipped(store.skipped())
            w.set_attribute("shards", json.dumps(new_records))
            w.commit()


def _refused(index: Path) -> None:
    for opener in (lambda: open_store(index), lambda: open_rows(index, "train"),
                   lambda: Loader(index, "train", batch_size=4)):
        with pytest.raises(StreamnnError, match="not a plain relative path inside the store's folder") as err:
            opener()
        assert str(err.value).startswith(f"{index}: ") and "\n" not in str(err.value)


FORMS = {
    "absolute": lambda shard, index: str(shard),
    "dot": lambda shard, index: "./" + shard.relative_to(index.parent).as_posix(),
    "dotdot": lambda shard, index: f"../{index.parent.name}/" + shard.relative_to(index.parent).as_posix(),
    "inner dotdot": lambda shard, index: f"{shard.parent.name}/../" + shard.relative_to(index.parent).as_posix(),
    "double slash": lambda shard, index: shard.relative_to(index.parent).as_posix().replace("/", "//"),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_crafted_shard_paths_are_refused(sharded, tmp_path, form):
    index = sharded.parent / f"crafted-{form.replace(' ', '-')}.h5"
    rewrite_index(sharded, index, lambda shard: FORMS[form](shard, sharded))
    try:
        _refused(index)
    finally:
        index.unlink()


def test_plain_relative_path_into_another_folder_reads_the_same_rows(sharded, tmp_path):
    folder = tmp_path / "elsewhere"
    shutil.copytree(sharded.parent, folder)
    moved = folder / "s.h5"
    with open_store(moved) as store:
        shards = list(store.shards)
    other = folder / "parts" / "deeper"
    other.mkdir(parents=True)
    for shard in shards:
        shutil.copy2(shard, other / shard.name)
    index = folder / "other.h5"
    rewrite_index(moved, index, lambda shard: f"parts/deeper/{shard.name}")
    with open_store(sharded) as a, open_store(index) as b:
        assert a.fingerprint == b.fingerprint and all(p.parent == other for p in b.shards)
        b.verify()
    for reader in ("mmap", "pread"):
        with Loader(sharded, "train", batch_size=5, seed=2, reader=reader) as la, \
                Loader(index, "train", batch_size=5, seed=2, reader=reader) as lb:
            for (xa, ya), (xb, yb) in zip(la, lb):
                assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(["a", "b.h5", ".", "..", "", "x y", "é"]), min_size=1, max_size=5),
       absolute=st.booleans(), trailing=st.booleans())
def test_only_normal_relative_paths_inside_are_plain(parts, absolute, trailing):
    name = ("/" if absolute else "") + "/".join(parts) + ("/" if trailing else "")
    expected = (not absolute and not trailing and all(p not in (".", "..", "") for p in parts))
    assert plain_relative(name) == expected, name
