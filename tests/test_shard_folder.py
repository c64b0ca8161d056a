"""The shard folder belongs to one index: files of the user's (or of another store) in it are never
replaced or removed, whatever K, --force or an earlier index; sizes are checked before anything is
allocated; a one-class tree is refused at pack time; a file size limit is one line, no temporaries."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocking import start_blocked
from imagetree import make_tree
from streamnn import StreamnnError, open_store
from streamnn.data.format import shard_folder
from streamnn.pack import pack
from streamnn.pack.sharded import pack_sharded

OPTIONS = {"size": 4, "workers": 1}
PACK = [sys.executable, "-m", "streamnn.cli.pack"]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sf") / "src"
    make_tree(root, {"": {"cats": 4, "dogs": 4}}, h=8, w=8)
    return root


@pytest.fixture(scope="module")
def foreign_shards(src, tmp_path_factory) -> Path:
    """Shards of another store (other.h5), K = 1..4."""
    folder = tmp_path_factory.mktemp("foreign")
    for k in range(1, 5):
        pack_sharded(src, folder / f"other{k}.h5", shards=k, **OPTIONS)
    return folder


def _snapshot(folder: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = os.path.relpath(path, folder)
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_file():
                out[rel] = path.read_bytes()
    return out


KINDS = ["text", "hdf5", "foreign shard", "link", "folder"]


def _plant(path: Path, kind: str, foreign: Path, tmp: Path) -> None:
    r, k = (int(x) for x in path.stem.replace("part-", "").split("-of-"))
    if kind == "text":
        path.write_text("notes\n")
    elif kind == "hdf5":
        with h5py.File(path, "w") as f:
            f["x"] = [1, 2, 3]
    elif kind == "foreign shard":
        shutil.copy(foreign / f"other{k}.h5.shards" / f"part-{r}-of-{k}.h5", path)
    elif kind == "link":
        (tmp / "target.txt").write_text("link target\n")
        path.symlink_to(tmp / "target.txt")
    else:
        path.mkdir()
        (path / "inside.txt").write_text("kept\n")


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(k=st.integers(1, 4), earlier=st.one_of(st.none(), st.integers(1, 4)), force=st.booleans(),
       planted=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(1, 4), st.integers(0, 3)), max_size=3,
                        unique_by=lambda t: (t[1], t[2])))
def test_files_in_the_shard_folder_are_never_replaced_or_removed(src, foreign_shards, tmp_path_factory, k, earlier,
                                                                 force, planted):
    tmp = tmp_path_factory.mktemp("case")
    out = tmp / "d.h5"
    if earlier is not None:
        pack_sharded(src, out, shards=earlier, **OPTIONS)  # an earlier index of this store
    folder = shard_folder(out)
    folder.mkdir(exist_ok=True)
    ours = {p.name for p in folder.iterdir()}
    in_the_way = False
    for kind, k2, r in planted:
        path = folder / f"part-{min(r, k2 - 1)}-of-{k2}.h5"
        if path.name in ours or os.path.lexists(path):
            continue
        _plant(path, kind, foreign_shards, tmp)
        in_the_way |= k2 == k
    before = {name: data for name, data in _snapshot(folder).items() if name.split(os.sep)[0] not in ours}
    target = (tmp / "target.txt").read_bytes() if (tmp / "target.txt").exists() else None
    decoded = []
    try:
        pack_sharded(src, out, shards=k, force=force, progress=lambda done, total: decoded.append(done), **OPTIONS)
    except StreamnnError as exc:
        assert in_the_way or (earlier is not None and not force), exc
        assert "\n" not in str(exc)
        if in_the_way and (earlier is None or force):
            assert "is not a shard of this store" in str(exc) and decoded == []  # refused before decoding
    else:
        assert not in_the_way and (earlier is None or force)
        with open_store(out) as s:
            s.verify()
        names = {p.name for p in folder.iterdir()}
        assert {f"part-{r}-of-{k}.h5" for r in range(k)} <= names
        assert not any(n.endswith(f"-of-{earlier}.h5") for n in names - set(before)) or earlier == k
    after = _snapshot(folder)
    assert {name: after.get(name) for name in before} == before  # the user's files, byte for byte
    if target is not None:
        assert (tmp / "target.txt").read_bytes() == target
    assert not [n for n in os.listdir(folder) if n.startswith(".streamnn-tmp-")]


def test_stores_differing_in_extension_do_not_share_a_folder(src, tmp_path):
    pack_sharded(src, tmp_path / "a.h5", shards=2, **OPTIONS)
    pack_sharded(src, tmp_path / "a.hdf5", shards=3, **OPTIONS)
    pack_sharded(src, tmp_path / "a", shards=1, **OPTIONS)
    pack_sharded(src, tmp_path / "x.shards", shards=2, **OPTIONS)  # a name that looks like a shard folder
    for name in ("a.h5", "a.hdf5", "a", "x.shards"):
        with open_store(tmp_path / name) as s:
            s.verify()


def test_a_replaced_index_takes_its_old_shards_along_and_nothing_else(src, tmp_path):
    out = tmp_path / "d.h5"
    pack_sharded(src, out, shards=3, **OPTIONS)
    pack_sharded(src, tmp_path / "e.h5", shards=2, **OPTIONS)
    shutil.copy(out, tmp_path / "copy.h5")  # an index copied beside: it records d.h5's shards
    pack_sharded(src, tmp_path / "copy.h5", shards=2, force=True, **OPTIONS)
    assert sorted(p.name for p in shard_folder(out).iterdir()) == [f"part-{r}-of-3.h5" for r in range(3)]
    pack_sharded(src, out, shards=2, force=True, **OPTIONS)
    assert sorted(p.name for p in shard_folder(out).iterdir()) == ["part-0-of-2.h5", "part-1-of-2.h5"]
    pack(src, out, force=True, **OPTIONS)  # a one-file store replaces it: the shards are left (not removed)
    with open_store(tmp_path / "e.h5") as s:
        s.verify()


def test_force_does_not_replace_a_shard_named_as_out(src, tmp_path):
    pack_sharded(src, tmp_path / "d.h5", shards=2, **OPTIONS)
    shard = shard_folder(tmp_path / "d.h5") / "part-0-of-2.h5"
    data = shard.read_bytes()
    with pytest.raises(StreamnnError, match="is a shard of a sharded store"):
        pack(src, shard, force=True, **OPTIONS)
    assert shard.read_bytes() == data


def test_killed_run_shards_are_ours_on_the_rerun(src, tmp_path):
    """Shards renamed into place by a run that died before writing its index are recognised."""
    out = tmp_path / "d.h5"
    pack_sharded(src, out, shards=2, **OPTIONS)
    out.unlink()  # as if killed between the shards and the index
    pack_sharded(src, out, shards=2, **OPTIONS)
    with open_store(out) as s:
        s.verify()


# -- sizes ------------------------------------------------------------------------------------
def test_more_shards_than_images_is_an_error_before_anything_is_written(src, tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([*PACK, str(src), "-o", str(tmp_path / "d.h5"), "--shards", "10000", "--workers", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "--shards 10000 is more than the 8 image files to pack" in r.stderr
    assert os.listdir(tmp_path) == [] and time.monotonic() - t0 < 20


def test_sigterm_during_a_many_shard_pack_ends_at_once(tmp_path):
    root = tmp_path / "src"
    make_tree(root, {"": {"cats": 100, "dogs": 100}}, h=4, w=4)
    out = tmp_path / "d.h5"
    proc = start_blocked([*PACK, str(root), "-o", str(out), "--size", "4", "--workers", "1", "--shards", "200"],
                         tmp_path / "blocked", timeout=120, STREAMNN_TEST_BLOCK_ON="dog.100.jpg")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 143 and err.count("\n") == 1 and err.startswith("Error: interrupted"), err
    assert not out.exists() and os.listdir(shard_folder(out)) == []


# -- one class ---------------------------------------------------------------------------------
def test_a_one_class_tree_is_refused_unless_asked_for(tmp_path):
    root = tmp_path / "src"
    make_tree(root, {"training_set": {"cats": 3}, "test_set": {"cats": 1}}, h=8, w=8)
    r = subprocess.run([*PACK, str(root), "-o", str(tmp_path / "d.h5"), "--workers", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "only one class folder ('cats')" in r.stderr
    assert not (tmp_path / "d.h5").exists()
    r = subprocess.run([*PACK, str(root), "-o", str(tmp_path / "d.h5"), "--workers", "1", "--classes", "cats"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Warning: one class only ('cats')" in r.stderr + r.stdout, r.stderr


# -- a file size limit -------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [6000, 20000, 45000])
@pytest.mark.parametrize("shards", [None, 1, 3])
def test_a_file_size_limit_while_writing_is_one_line_and_no_temporary(tmp_path, shards, limit):
    """RLIMIT_FSIZE (SIGXFSZ ignored, as Python does) makes HDF5's writes, flushes and closes fail."""
    root = tmp_path / "src"
    make_tree(root, {"": {"cats": 20, "dogs": 20}}, h=16, w=16)
    (tmp_path / "o").mkdir()
    out = tmp_path / "o" / "s.h5"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from streamnn.cli.pack import main; sys.argv[0] = 'streamnn-pack'; main()")
    args = [str(root), "-o", str(out), "--size", "16", "--workers", "1"] + (["--shards", str(shards)] if shards else [])
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "File too large" in r.stderr, r.stderr
    assert r.stderr.startswith("Error: ") and "Exception ignored" not in r.stderr
    left = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "o") for f in files]
    assert left == []
