"""Every command handles SIGINT and SIGTERM alike; a temporary left by a killed writer is removed by
the next write of the same target, and only then; streamnn-predict's messages."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from streamnn.atomic import TMP_PREFIX, _owner_tag, atomic_write, remove_stale_temporaries
from streamnn.cli.predict import main as predict_main
from streamnn.cli.train import main as train_main
from streamnn.run.folder import LATEST
from tinystore import make_store


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_temporary_of_a_dead_writer_is_removed_by_the_next_write(tmp_path):
    tag = _owner_tag()
    dead = f"{tag[:8]}{_dead_pid():07d}-"
    stale = tmp_path / f"{TMP_PREFIX}out.txt.{dead}abcdefgh"
    live = tmp_path / f"{TMP_PREFIX}out.txt.{tag[:8]}{os.getppid():07d}-abcdefgh"   # a running process
    other_host = tmp_path / f"{TMP_PREFIX}out.txt.hzzzzzz{dead[7:]}abcdefgh"
    untagged = tmp_path / f"{TMP_PREFIX}out.txt.abcdefgh"
    other_target = tmp_path / f"{TMP_PREFIX}other.txt.{dead}abcdefgh"
    for p in (stale, live, other_host, untagged, other_target):
        p.write_bytes(b"partial")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / f"{TMP_PREFIX}out.txt.{dead}linklink"
    os.symlink(victim, link)
    atomic_write(tmp_path / "out.txt", b"new")
    assert not stale.exists() and (tmp_path / "out.txt").read_bytes() == b"new"
    assert all(p.exists() for p in (live, other_host, untagged, other_target)) and os.path.islink(link)
    assert victim.read_text() == "precious"
    assert remove_stale_temporaries(tmp_path / "other.txt") == [other_target]


_GRID_CHILD = """
import sys, time
import streamnn.run.plots as plots
real = plots._save
def slow(fig, path, dpi, metadata=None):
    from streamnn.atomic import atomic_output
    with atomic_output(path, suffix=".png") as tmp:
        tmp.write_bytes(b"partial")
        print("writing", flush=True)
        time.sleep(30)
plots._save = slow
from streamnn.cli.info import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_info_grid_is_an_error_line_and_leaves_no_temporary(tmp_path, sig, status):
    store = make_store(tmp_path / "s.h5")
    proc = subprocess.Popen([sys.executable, "-c", _GRID_CHILD, str(store), "--grid", str(tmp_path / "g.png")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == status and err.strip() == "Error: interrupted", err
    assert sorted(os.listdir(tmp_path)) == ["s.h5"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pred")
    store = make_store(folder / "s.h5")
    r = CliRunner().invoke(train_main, [str(store), "--out", str(folder / "run"), "--epochs", "1", "--hidden", "4",
                                        "-q"])
    assert r.exit_code == 0, r.output
    image = folder / "a.png"
    cv2.imwrite(str(image), np.full((8, 8, 3), 90, np.uint8))
    return folder / "run" / LATEST, image


def test_predict_names_a_missing_input_and_still_predicts_the_others(checkpoint, tmp_path):
    ckpt, image = checkpoint
    r = CliRunner().invoke(predict_main, [str(ckpt), str(tmp_path / "nope"), str(image)])
    assert r.exit_code == 1
    assert f"Error: {tmp_path / 'nope'}: no such file or folder" in r.output and "could not be read" not in r.output
    assert f"{image}\t" in r.output
    r = CliRunner().invoke(predict_main, [str(ckpt), str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.output.strip() == f"Error: {tmp_path / 'nope'}: no such file or folder"


def test_predict_errors_are_spelled_like_the_other_commands(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = CliRunner().invoke(predict_main, [str(ckpt), str(bad)])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "error:" not in r.output, r.output
