"""The local cache of a store read by URL (``STREAMNN_REMOTE_CACHE``): a later epoch reads no byte
from the server, the byte limit holds, a killed writer or a damaged entry is never read, files
that are not ours are never removed, a changed object is not served from its old entries, and
processes sharing the folder get the batches of the local store."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamnn.data.loader import Loader
from streamnn.data.remote import cache as C
from streamnn.data.remote import open_object, set_cache

from servers import MockServer
from test_loader import make_store

N = 300
BLOCK = 8 << 10  # small blocks: a 43 KB store is six entries
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("c")
    make_store(d / "a.h5", N, "uint8", seed=1)
    make_store(d / "b.h5", N, "uint8", seed=2)  # the same size: a replacement
    return d / "a.h5", d / "b.h5"


@pytest.fixture
def mock(stores):
    server = MockServer(stores[0].read_bytes(), changed=stores[1].read_bytes())
    yield server
    server.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "BLOCK", BLOCK)
    monkeypatch.setattr("streamnn.data.remote.objects.REUSE_SECONDS", 0.0)  # every open asks the server
    folder = tmp_path / "cache"
    monkeypatch.setenv("STREAMNN_REMOTE_CACHE", str(folder))
    monkeypatch.setenv("STREAMNN_REMOTE_CACHE_LIMIT", "1M")
    return folder


KW = dict(batch_size=32, seed=3, augment="flip", prefetch=0)


def epochs(where, n=1, **kw):
    with Loader(where, "train", **{**KW, **kw}) as L:
        return [X.copy() for _ in range(n) for X, _ in L]


def entries(folder):
    return sorted(p.name for p in folder.iterdir() if C.ENTRY.fullmatch(p.name))


def test_a_second_epoch_reads_no_byte_from_the_server(stores, mock, cache):
    want = epochs(stores[0], 3)
    with Loader(mock.url(), "train", **KW) as L:
        got = [X.copy() for X, _ in L]
        reader = L._maker.reader
        obj = reader.obj
        assert obj.cache.settle(10)
        first, end = reader.offsets[0], reader.offsets[0] + N * reader.row_bytes  # the rows' blocks
        assert set(entries(cache)) >= {f"snc1-{obj.cache.key}-{k}.blk" for k in range(first // BLOCK, -(-end // BLOCK))}
        for batch in list(reader._ahead):  # reads of epoch 2 sent ahead, before the blocks were filled
            if batch.reads is not None:
                concurrent.futures.wait(batch.reads.tasks)
        before = mock.requests
        for _ in range(2):
            got += [X.copy() for X, _ in L]
        assert mock.requests == before  # epochs 2 and 3: not one request
        assert obj.cache.hits > 0
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_the_byte_limit_holds_and_only_the_first_blocks_of_a_larger_object_are_kept(stores, mock, cache, monkeypatch):
    entry = BLOCK + C.HEADER
    monkeypatch.setenv("STREAMNN_REMOTE_CACHE_LIMIT", str(3 * entry + 100))
    for name in ("one.h5", "two.h5"):  # two objects: the second evicts the first's least recently used
        with Loader(mock.url(name), "train", **KW) as L:
            want = epochs(stores[0])
            got = [X.copy() for X, _ in L]
            assert all(np.array_equal(a, b) for a, b in zip(got, want))
            c = L._maker.reader.obj.cache
            c.settle(10)
            assert c.eligible == 3
        names = entries(cache)
        assert sum((cache / n).stat().st_size for n in names) <= 3 * entry + 100
        assert {int(n.split("-")[2].split(".")[0]) for n in names} <= {0, 1, 2}
    assert all(c.key in n for n in names)  # the older object's entries were evicted first


def test_a_killed_writer_leaves_no_readable_entry(stores, mock, cache):
    """A filler killed between writing its temporary and linking it: the block is read from the
    server again, the temporary is removed once stale, and the bytes are right."""
    child = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
sys.path.insert(0, {str(HERE)!r})
import streamnn.data.remote.cache as C
C.BLOCK = {BLOCK}
os.fsync = lambda fd: time.sleep(60)  # hangs between write and link
from streamnn.data.remote import open_object
obj = open_object({mock.url()!r})
obj.read_into(0, [bytearray(10)])
time.sleep(60)
"""], env={**os.environ})
    try:
        end = time.monotonic() + 20
        while not [p for p in cache.glob(".snc1-*.tmp")] and time.monotonic() < end:
            time.sleep(0.05)
        temps = list(cache.glob(".snc1-*.tmp"))
        assert temps, "the writer did not start"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert entries(cache) == []
    obj = open_object(mock.url())
    buf = bytearray(100)
    before = mock.requests
    obj.read_into(50, [buf])
    assert mock.requests == before + 1 and bytes(buf) == mock.content[50:150]
    obj.cache.settle(10)
    assert len(entries(cache)) == 1
    old = time.time() - C.STALE_SECONDS - 1
    for t in temps:
        os.utime(t, (old, old))
    obj.cache.evict()
    assert not any(t.exists() for t in temps)  # ours and stale: removed
    obj.close()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "other object"])
def test_a_damaged_entry_is_never_read(stores, mock, cache, damage):
    obj = open_object(mock.url())
    obj.read_into(0, [bytearray(10)])
    obj.cache.settle(10)
    path = cache / entries(cache)[0]
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[:len(raw) // 2]
    elif damage == "flipped":
        raw[C.HEADER + 100] ^= 0xFF
    else:
        raw[16] ^= 0xFF  # the identity in the header
    path.unlink()
    path.write_bytes(bytes(raw))
    fresh = open_object(mock.url())
    buf = bytearray(BLOCK)
    before = mock.requests
    fresh.read_into(0, [buf])
    assert bytes(buf) == mock.content[:BLOCK] and mock.requests == before + 1
    fresh.close()
    obj.close()


def test_files_that_are_not_ours_are_never_removed(stores, mock, cache, monkeypatch):
    cache.mkdir()
    foreign = {"notes.txt": b"mine", f"snc1-{'0' * 32}-0.blk": b"x" * (BLOCK + C.HEADER),
               f".snc1-{'0' * 32}-0.1.abcdef01.tmp": b"not a cache file"}
    old = time.time() - 10 * C.STALE_SECONDS
    for name, data in foreign.items():
        (cache / name).write_bytes(data)
        os.utime(cache / name, (old, old))  # the oldest files: evicted first if they were ours
    monkeypatch.setenv("STREAMNN_REMOTE_CACHE_LIMIT", str(2 * (BLOCK + C.HEADER)))
    for name in ("one.h5", "two.h5", "three.h5"):
        epochs(mock.url(name))
        obj = open_object(mock.url(name))
        obj.cache.settle(10)
        obj.cache.evict()
        obj.close()
    for name, data in foreign.items():
        assert (cache / name).read_bytes() == data


def test_a_changed_object_is_not_served_from_its_old_entries(stores, mock, cache):
    epochs(mock.url(), 1)
    obj = open_object(mock.url())
    obj.cache.settle(10)
    old = entries(cache)
    assert old
    obj.close()
    mock.faults = ["change"]  # the object is replaced before the next open
    got = epochs(mock.url(), 2)
    want = epochs(stores[1], 2)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert not all(np.array_equal(a, b) for a, b in zip(got, epochs(stores[0], 2)))


def test_processes_sharing_the_cache_get_the_local_batches(stores, mock, cache):
    script = f"""
import hashlib, json, sys
sys.path.insert(0, {str(HERE)!r})
import streamnn.data.remote.cache as C
C.BLOCK = {BLOCK}
from streamnn.data.loader import Loader
with Loader({mock.url()!r}, "train", **{KW!r}) as L:
    print(json.dumps([hashlib.sha256(X.tobytes()).hexdigest() for _ in range(2) for X, _ in L]))
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    import hashlib
    want = [hashlib.sha256(X.tobytes()).hexdigest() for X in epochs(stores[0], 2)]
    assert [json.loads(o) for o in outs] == [want, want]
    assert entries(cache)


def test_set_cache_and_a_bad_limit(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMNN_REMOTE_CACHE", raising=False)
    monkeypatch.delenv("STREAMNN_REMOTE_CACHE_LIMIT", raising=False)
    set_cache(tmp_path / "c", "1.5G")
    assert C.cache_from_env() == (str(tmp_path / "c"), 3 << 29)
    set_cache(None)
    assert C.cache_from_env()[0] == ""
    assert C.parse_size("500M", "x") == 500 << 20 and C.parse_size("4096", "x") == 4096
    with pytest.raises(Exception, match="is not a size"):
        set_cache(tmp_path, "lots")
