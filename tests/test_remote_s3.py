"""Stores read from S3: SeaweedFS on 127.0.0.1 (a bucket made by the test, the store uploaded,
opened by its s3:// URL), credentials and endpoint from the standard AWS environment only."""
from __future__ import annotations

import numpy as np
import pytest

from streamnn import StreamnnError, open_store
from streamnn.data.loader import Loader

from servers import S3_SECRET, Seaweed
from test_loader import make_store


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    server = Seaweed(tmp_path_factory.mktemp("weed"))
    yield server
    server.close()


@pytest.fixture
def s3env(seaweed, monkeypatch):
    for name, value in seaweed.env.items():
        monkeypatch.setenv(name, value)
    return seaweed


@pytest.fixture(scope="module")
def uploaded(seaweed, tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "cats.h5"
    make_store(path, 70, "uint8")
    return path, seaweed.upload(path, "stores/cats.h5")


def test_s3_store_gives_the_local_metadata_and_batches(s3env, uploaded):
    path, url = uploaded
    with open_store(path) as local, open_store(url) as remote:
        assert remote.fingerprint == local.fingerprint and remote.counts() == local.counts()
        assert remote.nbytes() == path.stat().st_size
    for kw in (dict(order="exact", augment="flip,shift", world_size=2, rank=1), dict(order="block", prefetch=0)):
        with Loader(path, "train", batch_size=9, seed=4, **kw) as A, Loader(url, "train", batch_size=9, seed=4, **kw) as B:
            want = [(X.copy(), Y.copy()) for X, Y in A]
            got = [(X.copy(), Y.copy()) for X, Y in B]
            assert B.reader_mode == "remote"
        assert len(got) == len(want)
        assert all(np.array_equal(x, xw) and np.array_equal(y, yw) for (x, y), (xw, yw) in zip(got, want))


def test_s3_errors_are_one_line_and_name_no_endpoint_or_secret(s3env, uploaded, monkeypatch):
    bad = "s3://streamnn-test/stores/missing.h5"
    with pytest.raises(StreamnnError, match="no such object") as info:
        open_store(bad)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setattr("streamnn.data.remote.objects.REUSE_SECONDS", 0.0)  # ask the server again
    with pytest.raises(StreamnnError, match="access denied .S3 SignatureDoesNotMatch, HTTP 403.") as denied:
        open_store(uploaded[1])
    for err in (info.value, denied.value):
        text = str(err)
        assert "\n" not in text and "127.0.0.1" not in text and S3_SECRET not in text and "wrong" not in text


def test_s3_object_replaced_under_the_loader_is_a_one_line_error(s3env, seaweed, uploaded, tmp_path):
    path, _ = uploaded
    url = seaweed.upload(path, "stores/replaced.h5")
    other = tmp_path / "other.h5"
    make_store(other, 70, "uint8", seed=8)
    with Loader(url, "train", batch_size=9, prefetch=0) as L:
        it = iter(L)
        next(it)
        seaweed.upload(other, "stores/replaced.h5")
        L._maker.reader.forget()  # drop what was read ahead: the next batch is read now
        with pytest.raises(StreamnnError, match="changed on the server"):
            for _ in it:
                pass


def test_a_sharded_store_in_s3_is_read_by_the_key_of_its_index(s3env, seaweed, tmp_path):
    from imagetree import make_tree
    from streamnn.data.format import shard_folder
    from streamnn.pack.sharded import pack_sharded
    make_tree(tmp_path / "src", {"training_set": {"cats": 5, "dogs": 4}})
    index = tmp_path / "s.h5"
    pack_sharded(tmp_path / "src", index, shards=2, size=(6, 8), workers=1, seed=1)
    url = seaweed.upload(index, "sharded/s.h5")
    for part in shard_folder(index).iterdir():
        seaweed.upload(part, f"sharded/s.h5.shards/{part.name}")
    with open_store(index) as local, open_store(url) as remote:
        assert remote.fingerprint == local.fingerprint and remote.paths("train") == local.paths("train")
    with Loader(index, "train", batch_size=4, seed=1) as A, Loader(url, "train", batch_size=4, seed=1) as B:
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(A, B, strict=True))


def test_a_key_with_spaces_and_non_ascii_characters_is_read(s3env, seaweed, uploaded):
    path, _ = uploaded
    url = seaweed.upload(path, "stores/a cat/caf\u00e9 +~%1.h5")  # each segment URI-encoded, as SigV4 signs it
    with open_store(path) as local, open_store(url) as remote:
        assert remote.fingerprint == local.fingerprint
        assert np.array_equal(remote.dataset("train")[:], local.dataset("train")[:])
