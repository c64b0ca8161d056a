"""A checkpoint write that fails (a file-size limit, a full disk) is one line, whatever the size it
fails at: no "Exception ignored" from h5py's finalizers, no crash at exit, no temporary left, and an
earlier checkpoint intact."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

from tinystore import make_store

CHILD = r"""
import os, sys
import numpy as np
from streamnn.errors import StreamnnError
from streamnn.run.checkpoint import load_checkpoint, save_checkpoint

rng = np.random.default_rng(0)
content = {"model": {"W": rng.random((64, 96)), "b": rng.random((64, 1)), "names": ["a", "b"]},
           "progress": {"step": 3, "best": 0.5, "note": "x"}, "history": {"loss": rng.random(7)}}
folder = sys.argv[1]
save_checkpoint(os.path.join(folder, "kept.h5"), {"small": {"v": 1}})
for step in range(40):  # the limit falls at every stage of the file: attributes, data, metadata, close
    content["progress"]["step"] = step
    content["model"]["W"] = rng.random((16 + 8 * step, 96))
    try:
        save_checkpoint(os.path.join(folder, f"c{step}.h5"), content)
    except StreamnnError as exc:
        print("ERR", exc)
    else:
        assert load_checkpoint(os.path.join(folder, f"c{step}.h5"))["progress"]["step"] == step
        print("OK")
assert load_checkpoint(os.path.join(folder, "kept.h5")) == {"small": {"v": 1}}
"""


def limited(kib: int):
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (kib << 10, kib << 10))
    return pre


def test_checkpoints_at_a_file_size_limit_fail_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                            preexec_fn=limited(48), timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines.count("OK") >= 3 and len(lines) == 40
    for line in lines:
        assert line == "OK" or (line.startswith("ERR ") and line.endswith(": File too large")), line
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".streamnn-tmp-")]


def test_training_at_a_file_size_limit_stops_with_one_line(tmp_path):
    store = make_store(tmp_path / "s.h5", n_train=12)
    for kib in (20, 40):
        out = tmp_path / f"run{kib}"
        result = subprocess.run([sys.executable, "-m", "streamnn.cli.train", str(store), "--out", str(out),
                                 "--hidden", "64", "--epochs", "2", "--batch-size", "4", "-q"],
                                capture_output=True, text=True, preexec_fn=limited(kib), timeout=120)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [f"Error: {out / 'checkpoint-best.h5'}: File too large"]
        assert not [p for p in os.listdir(out) if p.startswith(".streamnn-tmp-")]
