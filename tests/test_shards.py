"""Sharded stores: the same store whatever K (--shards and mpiexec), integrity, failures, leftovers."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from blocking import BLOCKER, start_blocked
from imagetree import make_tree
from mpi import require_mpi, run_mpmd
from streamnn import StreamnnError, open_store
from streamnn.atomic import TMP_PREFIX
from streamnn.data.loader import Loader
from streamnn.pack import pack
from streamnn.data.readers import open_rows
from streamnn.data.format import shard_folder
from streamnn.dist import part
from streamnn.pack.sharded import pack_sharded

# A 2-file split: with K = 3 one shard holds none of it; one broken file is skipped.
LAYOUT = {"training_set": {"cats": 9, "dogs": 8}, "test_set": {"cats": 1, "dogs": 1}}
OPTIONS = {"size": (6, 8), "workers": 1, "seed": 4}
PACK = [sys.executable, "-m", "streamnn.cli.pack"]
INFO = [sys.executable, "-m", "streamnn.cli.info"]



@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    make_tree(root, LAYOUT)
    (root / "training_set" / "dogs" / "dog.99.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def one_file(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "one.h5"
    pack(src, out, **OPTIONS)
    return out


def assert_same_store(a_path: Path, b_path: Path) -> None:
    with open_store(a_path) as a, open_store(b_path) as b:
        assert a.fingerprint == b.fingerprint and a.splits == b.splits
        assert a.counts() == b.counts() and a.skipped() == b.skipped() and a.class_names == b.class_names
        for key in ("image_shape", "dtype", "scale", "channel_order", "options"):
            assert getattr(a, key) == getattr(b, key), key
        for s in a.splits:
            rows = np.arange(a.n_rows(s))
            assert a.paths(s) == b.paths(s)
            np.testing.assert_array_equal(a.labels(s), b.labels(s))
            np.testing.assert_array_equal(a.read_rows(s, rows), b.read_rows(s, rows))
            for reader in ("mmap", "pread"):  # every row in order: runs across the shard boundaries
                part = open_rows(b_path, s, reader=reader)
                try:
                    got = part.read(rows, np.empty((len(rows), a.n_features), np.float32))
                    np.testing.assert_array_equal(got, a.read_rows(s, rows))
                finally:
                    part.close()
        for x, y in zip(a.stats(), b.stats()):
            np.testing.assert_array_equal(x, y)  # bit for bit: exact integer sums, one rounding
    for split, reader in (("train", "mmap"), ("test", "mmap"), ("train", "pread")):  # the loader's exact shuffle
        with Loader(a_path, split, batch_size=5, seed=1, reader=reader) as la, \
                Loader(b_path, split, batch_size=5, seed=1, reader=reader) as lb:
            assert lb.reader_mode == ("segments:memmap" if reader == "mmap" else "pread")
            for (xa, ya), (xb, yb) in zip(la, lb, strict=True):
                np.testing.assert_array_equal(xa, xb)
                np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sharded_store_equals_the_one_file_store(src, one_file, tmp_path, k):
    out = tmp_path / "s.h5"
    result = pack_sharded(src, out, shards=k, **OPTIONS)
    assert sorted(p.name for p in shard_folder(out).iterdir()) == [f"part-{r}-of-{k}.h5" for r in range(k)]
    assert len(result.skipped) == 1 and result.n_images == 19
    assert_same_store(one_file, out)
    with h5py.File(out) as f:  # what h5py / HDFView users see: virtual datasets over relative paths
        assert f["train/X"].is_virtual
        assert {s.file_name for s in f["train/X"].virtual_sources()} <= {f"s.h5.shards/part-{r}-of-{k}.h5"
                                                                        for r in range(k)}
    with open_store(out) as s:
        s.verify()


def test_shares_cover_every_row_once():
    for n in range(12):
        for k in range(1, 5):
            assert [i for r in range(k) for i in range(n)[part(n, r, k)]] == list(range(n))


def test_moved_store_opens_and_loader_state_carries_over(src, one_file, tmp_path):
    (tmp_path / "a").mkdir()
    pack_sharded(src, tmp_path / "a" / "s.h5", shards=2, **OPTIONS)
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "a", moved)
    with Loader(one_file, "train", batch_size=4, seed=3) as la:
        it = iter(la)
        next(it)
        state = la.state_dict()
        rest = [x for x, _ in it]
    with Loader(moved / "s.h5", "train", batch_size=4, seed=3) as lb:
        lb.load_state_dict(state)  # same fingerprint: a checkpoint does not care about sharding
        np.testing.assert_array_equal(np.concatenate(rest, 1), np.concatenate([x for x, _ in lb], 1))


@pytest.fixture()
def sharded(src, tmp_path) -> Path:
    out = tmp_path / "s.h5"
    pack_sharded(src, out, shards=2, **OPTIONS)
    return out


def _info_error(path: Path, *args: str) -> str:
    proc = subprocess.run([*INFO, str(path), *args], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def test_missing_shard_is_a_one_line_error(sharded):
    (shard_folder(sharded) / "part-1-of-2.h5").unlink()
    with pytest.raises(StreamnnError, match="shard s.h5.shards/part-1-of-2.h5 is missing"):
        open_store(sharded)
    assert "part-1-of-2.h5 is missing" in _info_error(sharded)


def test_replaced_shard_is_refused(src, sharded, tmp_path):
    pack_sharded(src, tmp_path / "other.h5", shards=2, **{**OPTIONS, "seed": 5})  # same sizes, other rows
    shutil.copy(tmp_path / "other.h5.shards" / "part-0-of-2.h5", shard_folder(sharded) / "part-0-of-2.h5")
    with pytest.raises(StreamnnError, match="shard s.h5.shards/part-0-of-2.h5 was altered"):
        open_store(sharded)
    with pytest.raises(StreamnnError, match="part-0-of-2.h5 was altered"):
        open_rows(sharded, "train")  # a loader's reader, opened later, checks again


def test_shard_edited_in_place_fails_verify(sharded):
    with h5py.File(shard_folder(sharded) / "part-1-of-2.h5", "r+") as f:
        y = f["train/y"][...]
        i, j = 0, int(np.flatnonzero(y != y[0])[0])
        y[[i, j]] = y[[j, i]]  # two rows swap labels: same counts, size and attributes
        f["train/y"][...] = y
    with open_store(sharded):
        pass
    assert "does not match its fingerprint" in _info_error(sharded, "--verify")


def test_cli_shards_and_leftovers_of_killed_runs(src, one_file, tmp_path):
    out = tmp_path / "s.h5"
    folder = shard_folder(out)
    pack_sharded(src, out, shards=2, **OPTIONS)  # an earlier run with another K: replaced below
    stale = folder / f"{TMP_PREFIX}part-0-of-2.h5.abc123"
    stale.write_bytes(b"half a shard")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    (folder / "part-4-of-5.h5").write_bytes(b"not a shard of this store: kept")
    (folder / "notes.txt").write_text("not ours")
    proc = subprocess.run([*PACK, str(src), "-o", str(out), "--size", "6x8", "--seed", "4", "--workers", "1",
                           "--shards", "3", "--force"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Removed 1 stale temporary file" in proc.stdout
    assert sorted(p.name for p in folder.iterdir()) == sorted(["notes.txt", "part-4-of-5.h5"] + [
        f"part-{r}-of-3.h5" for r in range(3)])  # the K = 2 shards are gone, the foreign file stays
    assert (folder / "part-4-of-5.h5").read_bytes() == b"not a shard of this store: kept"
    assert_same_store(one_file, out)
    info = subprocess.run([*INFO, str(out), "--verify"], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "shards       3 files in" in info.stdout and "(and every shard its own)" in info.stdout


def test_shard_folder_must_be_a_plain_folder_outside_src(src, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "s.h5.shards").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StreamnnError, match="s.h5.shards: is a symbolic link"):
        pack_sharded(src, tmp_path / "s.h5", shards=2, **OPTIONS)
    (tmp_path / "f.h5.shards").write_text("mine")
    with pytest.raises(StreamnnError, match="f.h5.shards: exists and is not a folder"):
        pack_sharded(src, tmp_path / "f.h5", shards=2, **OPTIONS)
    shutil.copytree(src, tmp_path / "x.h5.shards" / "src")
    with pytest.raises(StreamnnError, match="the shard folder and SRC .* overlap"):
        pack_sharded(tmp_path / "x.h5.shards" / "src", tmp_path / "x.h5", shards=2, **OPTIONS)
    assert list((tmp_path / "elsewhere").iterdir()) == [] and not (tmp_path / "s.h5").exists()


def _mpiexec(n: int, *args: str) -> list[str]:
    """``mpiexec -n n streamnn-pack args...`` (skips, or fails in CI, without MPI)."""
    return [require_mpi(), "-n", str(n), sys.executable, "-m", "streamnn.cli.pack", *args]


@pytest.fixture(autouse=True)
def _private_tmpdir(tmp_path, monkeypatch):
    """mpiexec (hydra) leaves a topology file in $TMPDIR per run: keep them in the test's folder."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def test_mpiexec_two_ranks_write_the_same_store(src, one_file, tmp_path):
    out = tmp_path / "s.h5"
    proc = subprocess.run(_mpiexec(2, str(src), "-o", str(out), "--size", "6x8", "--seed", "4"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Wrote ") == 1  # rank 0 reports
    assert sorted(p.name for p in shard_folder(out).iterdir()) == ["part-0-of-2.h5", "part-1-of-2.h5"]
    assert_same_store(one_file, out)
    with open_store(out) as s:
        assert s.command.startswith("mpiexec -n 2 streamnn-pack")


def test_mpiexec_error_found_by_rank_0_is_reported_once(tmp_path):
    proc = subprocess.run(_mpiexec(2, str(tmp_path / "nowhere"), "-o", str(tmp_path / "s.h5")),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if line.startswith("Error:")] == [
        f"Error: {tmp_path / 'nowhere'}: no such folder"], proc.stderr


def test_mpiexec_failing_rank_fails_the_command_with_one_error(src, tmp_path):
    proc = subprocess.run(_mpiexec(2, str(src), "-o", str(tmp_path / "s.h5"), "--size", "6x8",
                                   "--max-skip-fraction", "0"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "could not be packed" in errors[0], proc.stderr
    assert errors[0].startswith("Error: rank 1: ")  # the broken file is in rank 1's share
    assert not (tmp_path / "s.h5").exists()
    assert list(shard_folder(tmp_path / "s.h5").iterdir()) == []  # every rank removed its temporary shard


def _rank_pid(root: int, rank: int) -> int:
    """The pid of MPI rank ``rank`` among the descendants of ``root``."""
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"PMI_RANK={rank}".encode() in env and b"streamnn.cli.pack" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
            for tid in os.listdir(f"/proc/{pid}/task"):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    raise AssertionError(f"rank {rank} not found")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process in /proc (Linux)")
def test_killed_rank_fails_the_command_and_leaves_no_index(src, one_file, tmp_path):
    out = tmp_path / "s.h5"
    with open_store(one_file) as s:  # a file of rank 1's share of the training split
        paths = s.paths("train")
    blocked = Path(paths[-1]).name
    proc = start_blocked(_mpiexec(2, str(src), "-o", str(out), "--size", "6x8", "--seed", "4", "--workers", "1"),
                         tmp_path / "blocked", timeout=120, STREAMNN_TEST_BLOCK_ON=blocked)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    # The next run removes what the killed one left (temporary shards), and succeeds.
    rerun = subprocess.run([*PACK, str(src), "-o", str(out), "--size", "6x8", "--seed", "4", "--workers", "1",
                            "--shards", "2"], capture_output=True, text=True, timeout=120)
    # rank 1's temporary shard, and rank 0's unless it was killed before creating it
    assert re.search(r"Removed [12] stale temporary file", rerun.stdout), rerun.stdout
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in shard_folder(out).iterdir()) == ["part-0-of-2.h5", "part-1-of-2.h5"]
    assert_same_store(one_file, out)


@pytest.mark.parametrize("fault", ["STREAMNN_TEST_BLOCK_ON", "STREAMNN_TEST_EXIT_ON"])
def test_a_hung_or_leaving_rank_ends_the_job_after_the_timeout(src, one_file, tmp_path, fault):
    """Rank 1 hangs in decoding, or leaves without a word: rank 0 gives up waiting for it after
    STREAMNN_MPI_TIMEOUT seconds and ends every rank (as streamnn-train does), one line."""
    out = tmp_path / "s.h5"
    with open_store(one_file) as s:
        name = Path(s.paths("train")[-1]).name  # in rank 1's share
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BLOCKER), os.environ.get("PYTHONPATH")])),
           "STREAMNN_MPI_TIMEOUT": "3", fault: name, "STREAMNN_TEST_BLOCKED": str(tmp_path / "blocked")}
    start = time.monotonic()
    proc = subprocess.run(_mpiexec(2, str(src), "-o", str(out), "--size", "6x8", "--seed", "4", "--workers", "1"),
                          capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert [line for line in proc.stderr.splitlines() if line.startswith("Error:")] == [
        "Error: rank 0: no answer from the other ranks for 3 s in gather (a rank hung or was stopped); "
        "aborting the job"], proc.stderr
    assert not out.exists()


def test_ctrl_c_stops_every_rank(src, one_file, tmp_path):
    out = tmp_path / "s.h5"
    with open_store(one_file) as s:
        blocked = Path(s.paths("train")[-1]).name  # rank 1 waits there; rank 0 waits for rank 1
    proc = start_blocked(_mpiexec(2, str(src), "-o", str(out), "--size", "6x8", "--seed", "4", "--workers", "1"),
                         tmp_path / "blocked", timeout=120, STREAMNN_TEST_BLOCK_ON=blocked)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal does to mpiexec
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.startswith("Error:")] == [
        f"Error: interrupted; nothing written ({out} left as it was)"], err
    assert not out.exists() and not list(shard_folder(out).glob("part-*"))


def test_mpiexec_ranks_given_other_options_stop_before_anything_is_written(src, tmp_path):
    out = tmp_path / "s.h5"
    pack_cmd = [sys.executable, "-m", "streamnn.cli.pack", str(src), "-o", str(out)]
    result, _ = run_mpmd([[*pack_cmd, "--size", "6x8"], [*pack_cmd, "--size", "8"]], timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: the ranks do not run the same packing: size differs on rank 1 of 2 from rank 0; give every "
        "rank the same arguments and the same store"]
    assert not out.exists() and not shard_folder(out).exists()
