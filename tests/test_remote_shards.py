"""A sharded store read by the URL of its index (nginx on 127.0.0.1): the store a local copy is,
its shards resolved beside the index and checked on open (size, fingerprint, metadata)."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from imagetree import make_tree
from streamnn import StreamnnError, open_store
from streamnn.cli.info import main as info_main
from streamnn.data.format import shard_folder
from streamnn.data.loader import Loader
from streamnn.pack import pack
from streamnn.pack.sharded import pack_sharded

from test_remote import nginx  # noqa: F401  (the session's nginx)

LAYOUT = {"training_set": {"cats": 9, "dogs": 8}, "test_set": {"cats": 2, "dogs": 1}}
OPTIONS = {"size": (6, 8), "workers": 1, "seed": 4}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    make_tree(root, LAYOUT)
    return root


@pytest.fixture(scope="module")
def one_file(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one.h5"
    pack(src, out, **OPTIONS)
    return out


def serve(nginx, src, name, k):  # noqa: F811
    """Pack ``src`` into ``k`` shards served at ``name``; returns (local index, URL)."""
    out = nginx.root / name / "s.h5"
    out.parent.mkdir()
    pack_sharded(src, out, shards=k, **OPTIONS)
    return out, nginx.url(f"{name}/s.h5")


@pytest.mark.parametrize("k", [1, 3])
def test_a_sharded_store_by_url_is_the_one_file_store(nginx, src, one_file, k):  # noqa: F811
    local, url = serve(nginx, src, f"k{k}", k)
    with open_store(one_file) as a, open_store(url) as b:
        assert b.path == url and b.fingerprint == a.fingerprint and b.splits == a.splits
        assert b.counts() == a.counts() and b.skipped() == a.skipped() and b.options == a.options
        assert b.nbytes() == local.stat().st_size + sum(p.stat().st_size for p in shard_folder(local).iterdir())
        for s in a.splits:
            rows = np.arange(a.n_rows(s))
            assert b.paths(s) == a.paths(s) and np.array_equal(b.labels(s), a.labels(s))
            assert np.array_equal(b.read_rows(s, rows[::-1]), a.read_rows(s, rows[::-1]))
        assert all(np.array_equal(x, y) for x, y in zip(a.stats(), b.stats()))
        assert b.shards == [nginx.url(f"k{k}/s.h5.shards/{p.name}") for p in sorted(shard_folder(local).iterdir())]
        b.verify()  # the view's fingerprint, then every shard's, each read by its URL
    info = CliRunner().invoke(info_main, [url])
    assert info.exit_code == 0, info.output
    assert f"shards       {k} files in {nginx.url(f'k{k}/s.h5.shards')}/" in info.output
    for split, kw in (("train", dict(order="exact", augment="flip")), ("test", dict(shuffle=False)),
                      ("train", dict(order="block", block_rows=3, world_size=2, rank=1))):
        with Loader(one_file, split, batch_size=4, seed=2, **kw) as A, Loader(url, split, batch_size=4, seed=2, **kw) as B:
            want = [(X.copy(), Y.copy()) for _ in range(2) for X, Y in A]
            got = [(X.copy(), Y.copy()) for _ in range(2) for X, Y in B]
            assert B.reader_mode == "remote"
        assert len(got) == len(want)
        assert all(np.array_equal(x, xw) and np.array_equal(y, yw) for (x, y), (xw, yw) in zip(got, want))


@pytest.mark.parametrize("how, message", [
    ("missing", r"part-1-of-2\.h5: no such object \(HTTP 404\)"),
    ("grown", r"shard s\.h5\.shards/part-1-of-2\.h5 was altered \(size"),
    ("replaced", r"shard s\.h5\.shards/part-0-of-2\.h5 was altered \(its fingerprint or metadata"),
])
def test_an_altered_shard_is_a_one_line_error(nginx, src, tmp_path, how, message, monkeypatch):  # noqa: F811
    monkeypatch.setattr("streamnn.data.remote.objects.REUSE_SECONDS", 0.0)
    local, url = serve(nginx, src, f"bad-{how}", 2)
    folder = shard_folder(local)
    if how == "missing":
        (folder / "part-1-of-2.h5").unlink()
    elif how == "grown":
        with open(folder / "part-1-of-2.h5", "ab") as f:
            f.write(b"\0" * 10)
    else:  # the same sizes, other rows
        other = tmp_path / "o.h5"
        pack_sharded(src, other, shards=2, **{**OPTIONS, "seed": 5})
        shutil.copy(shard_folder(other) / "part-0-of-2.h5", folder / "part-0-of-2.h5")
    with pytest.raises(StreamnnError, match=message) as info:
        open_store(url)
    assert "\n" not in str(info.value) and str(info.value).startswith("http://127.0.0.1")


def test_a_sharded_url_with_a_query_is_refused(nginx, src):  # noqa: F811
    _, url = serve(nginx, src, "query", 2)
    with pytest.raises(StreamnnError, match=re.escape("cannot have a query")):
        open_store(url + "?x=1")
