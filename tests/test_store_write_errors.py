"""A full disk or a file-size limit while a store is written (StoreWriter): one clean StreamnnError
naming the store and the errno's meaning, no temporary left, nothing left to h5py's finalizers
("Exception ignored in ObjectID.__dealloc__") and no signal death (HDF5 crashing at exit on a
file it could not close)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from streamnn import open_store

# One child process writes stores under many file-size limits (soft limit below an unlimited hard
# one, so that it can be raised again): the whole run must end normally, with clean stderr.
CHILD = r"""
import json, os, resource, signal, sys
import numpy as np
from streamnn.data.writer import StoreWriter
from streamnn.errors import StreamnnError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the write fails with EFBIG instead
folder, cases = sys.argv[1], json.loads(sys.argv[2])
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
for i, (limit, capacity, rows, compression, stats) in enumerate(cases):
    out = os.path.join(folder, f"s{i}.h5")
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with StoreWriter(out, class_names=["a", "b"], image_shape=(16, 16, 3), compression=compression) as w:
            w.add_split("train", capacity)
            w.write_rows("train", np.full((rows, 16, 16, 3), i % 251, np.uint8), [k % 2 for k in range(rows)],
                         [f"p{k}" for k in range(rows)])
            if stats:
                w.set_stats(np.zeros(768), np.ones(768))
                w.set_skipped([("bad.jpg", "not an image")] * 20)
            w.commit()
        result = "ok"
    except StreamnnError as exc:
        result = "error " + str(exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    print(json.dumps([i, result]), flush=True)
"""


def _cases() -> list[tuple[int, int, int, str | None, bool]]:
    cases = []
    for capacity, rows in ((10, 10), (10, 5), (100, 100), (100, 60)):  # rows < capacity: compaction
        for limit in (600, 2000, 3500, 6000, 9000, 14000, 30000, 60000, 120000, 200000, 260000, 320000, 400000):
            cases.append((limit, capacity, rows, None, capacity == 100))
    cases += [(limit, 100, 80, "gzip", True) for limit in (3000, 8000, 20000, 50000)]
    return cases


def test_file_size_limit_while_writing_is_one_clean_error(tmp_path: Path) -> None:
    cases = _cases()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), json.dumps(cases)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr[-2000:]
    results = dict(json.loads(line) for line in proc.stdout.splitlines())
    assert sorted(results) == list(range(len(cases)))
    failed = 0
    for i, (limit, capacity, rows, _, _) in enumerate(cases):
        out = tmp_path / f"s{i}.h5"
        if results[i] == "ok":
            with open_store(out) as store:  # a committed store is complete
                assert store.n_rows("train") == rows
                assert (store.read_rows("train", [rows - 1]) * 255).round().max() == i % 251
                store.verify()
        else:
            failed += 1
            assert results[i] == f"error {out}: {os.strerror(27)}", results[i]   # EFBIG: File too large
            assert not out.exists()
    assert failed >= len(cases) // 2  # most limits are below the store's size
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"s{i}.h5" for i in results if results[i] == "ok")


def test_failed_write_keeps_the_previous_store(tmp_path: Path) -> None:
    """A store being replaced stays as it was when the new one cannot be written."""
    out = tmp_path / "s.h5"
    code = CHILD.replace('out = os.path.join(folder, f"s{i}.h5")', 'out = os.path.join(folder, "s.h5")')
    ok = subprocess.run([sys.executable, "-c", code, str(tmp_path), json.dumps([[10**9, 10, 10, None, False]])],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)[1] == "ok", ok.stderr
    before = out.read_bytes()
    bad = subprocess.run([sys.executable, "-c", code, str(tmp_path), json.dumps([[20000, 100, 100, None, True]])],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 0 and bad.stderr == "", bad.stderr
    assert json.loads(bad.stdout)[1] == f"error {out}: {os.strerror(27)}"
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]
    assert np.isfinite(open_store(out).read_rows("train", [0])).all()
