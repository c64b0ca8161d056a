"""OS errors while training: a full disk while saving a checkpoint, a location where nothing may be
created, over-long names: one line naming the path and the errno's meaning, earlier files intact,
no temporary left."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from streamnn.atomic import TMP_PREFIX
from streamnn.cli.train import main as train_main
from streamnn.run.folder import BEST, LATEST
from tinystore import make_store

TRAIN = ["--hidden", "512", "--epochs", "1", "--no-progress", "-q", "--eval-split", "none"]


def _train_with_file_size_limit(args, limit):
    """streamnn-train in a process whose files cannot grow beyond ``limit`` bytes (EFBIG, as on a full disk)."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from streamnn.cli import streamnn_train; sys.argv[0] = 'streamnn-train'; streamnn_train()")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("s") / "s.h5")


def test_disk_full_while_saving_checkpoints_is_one_line_and_keeps_earlier_files(store, tmp_path):
    pytest.importorskip("resource")
    out = tmp_path / "run"
    r = _train_with_file_size_limit([str(store), "--out", str(out), *TRAIN], 150_000)
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"Error: {out / BEST}: {os.strerror(errno.EFBIG)}\n"
    assert not [p for p in os.listdir(out) if p.startswith(TMP_PREFIX)] and not (out / BEST).exists()

    fresh = tmp_path / "fresh"
    assert CliRunner().invoke(train_main, [str(store), "--out", str(fresh), *TRAIN]).exit_code == 0
    before = {p: (fresh / p).read_bytes() for p in (LATEST, BEST)}
    r = _train_with_file_size_limit(["--resume", "--out", str(fresh), "--epochs", "2"], 150_000)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"Error: {fresh}/checkpoint-") and os.strerror(errno.EFBIG) in r.stderr
    assert {p: (fresh / p).read_bytes() for p in (LATEST, BEST)} == before
    assert not [p for p in os.listdir(fresh) if p.startswith(TMP_PREFIX)]


@pytest.mark.parametrize("make_out", [
    lambda tmp: "/sys/streamnn-run",                                   # creating is refused (EPERM)
    lambda tmp: str(tmp / ("n" * 300)),                                # ENAMETOOLONG
    lambda tmp: str(tmp / "file.txt" / "run"),                         # a file where a folder belongs
])
def test_out_where_nothing_can_be_created_is_one_line(store, tmp_path, make_out):
    (tmp_path / "file.txt").write_text("mine")
    out = make_out(tmp_path)
    if out.startswith("/sys/") and os.access("/sys", os.W_OK) and os.path.isdir(out):  # pragma: no cover
        pytest.skip("/sys is writable here")
    r = CliRunner().invoke(train_main, [str(store), "--out", out, *TRAIN])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert r.output.startswith(f"Error: {out}") and r.output.count("\n") == 1, r.output
    assert (tmp_path / "file.txt").read_text() == "mine"
