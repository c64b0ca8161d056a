"""The BLAS thread policy: usable CPUs (affinity, cgroup quota), the loader's CPU, ranks, --threads."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import cv2
import pytest
from click.testing import CliRunner
from hypothesis import given, strategies as st

from streamnn import threads
from streamnn.cli.train import main as train_main
from streamnn.errors import StreamnnError
from streamnn.nn.models import ConvNet
from streamnn.run.folder import LATEST
from streamnn.run.state import load_run_config
from streamnn.run.trainer import Trainer
from test_train import assert_same_run, cfg, make_store, run


def _cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return str(tmp_path)


@pytest.mark.parametrize("v2,v1,quota", [
    ("150000 100000", None, 1.5), ("max 100000", None, None), ("50000 100000", None, 0.5),
    (None, ("200000", "100000"), 2.0), (None, ("-1", "100000"), None), (None, None, None),
    ("garbage", None, None)])
def test_cgroup_quota_v1_v2_unlimited_and_unreadable(tmp_path, v2, v1, quota):
    assert threads.cgroup_quota(_cgroup(tmp_path, v2, v1)) == quota


def test_usable_cpus_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for name in "abcd":
        (tmp_path / name).mkdir()
    assert threads.usable_cpus(_cgroup(tmp_path / "a")) == 4

    assert threads.usable_cpus(_cgroup(tmp_path / "b", "150000 100000")) == 2
    assert threads.usable_cpus(_cgroup(tmp_path / "c", "10000 100000")) == 1  # a tenth of a CPU: one thread
    assert threads.usable_cpus(_cgroup(tmp_path / "d", "800000 100000")) == 4  # quota above the affinity


@given(cpus=st.integers(1, 64), world=st.integers(1, 8), loader=st.booleans())
def test_auto_policy(cpus, world, loader):
    n = threads.choose_threads("auto", world_size=world, loader=loader, cpus=cpus)
    assert 1 <= n <= cpus
    if world > 1:
        assert n == 1  # one BLAS thread per rank under mpiexec
    else:
        assert n == max(1, cpus - loader)
    assert threads.choose_threads(3, world_size=world, loader=loader, cpus=cpus) == 3  # a number is kept


@pytest.mark.parametrize("bad", [0, -1, "0", "two", 1.5, "1.5", True, "", [2]])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(StreamnnError, match="threads must be 'auto' or a positive number"):
        threads.check_threads(bad)


def test_check_threads_accepts_auto_numbers_and_digit_strings():
    assert threads.check_threads("auto") == "auto" and threads.check_threads(None) == "auto"
    assert threads.check_threads(2) == 2 and threads.check_threads("3") == 3


def test_set_blas_threads_changes_the_count_at_run_time():
    before = threads.blas_threads()
    if before is None:
        pytest.skip("no BLAS library found by threadpoolctl")
    try:
        for n in (1, 3, 2):
            threads.set_blas_threads(n)
            assert threads.blas_threads() == n
    finally:
        threads.set_blas_threads(before)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_the_worker_pool_runs_every_block_once(size):
    pool = threads.WorkerPool(size)
    try:
        for count in (0, 1, 3, 50):
            seen: list[int] = []
            names: set[str] = set()
            pool.run(lambda i: (seen.append(i), names.add(threading.current_thread().name)), count)
            assert sorted(seen) == list(range(count))
            assert len(names) <= min(size, max(count, 1))
    finally:
        pool.close()


def test_the_worker_pool_raises_a_blocks_error_after_all_blocks_are_done():
    pool = threads.WorkerPool(3)
    done: list[int] = []

    def block(i: int) -> None:
        if i == 5:
            raise ValueError("block 5")
        time.sleep(0.001)
        done.append(i)

    try:
        with pytest.raises(ValueError, match="block 5"):
            pool.run(block, 20)
        assert len(done) == 19  # the other threads went on; nothing runs after run() returned
        time.sleep(0.01)
        assert len(done) == 19
        pool.run(done.append, 2)  # and the pool still works
        assert len(done) == 21
    finally:
        pool.close()


_FORKED_CHILD = """
import os, sys
from streamnn import threads
threads.set_workers(2)
pid = os.fork()
if pid == 0:  # the child: its pool has no helper threads, yet runs every block
    seen = []
    threads.run_blocks(seen.append, 5)
    os._exit(0 if sorted(seen) == list(range(5)) and threads.workers() == 1 else 1)
_, status = os.waitpid(pid, 0)
sys.exit(3 if os.waitstatus_to_exitcode(status) else 0 if threads.workers() == 2 else 4)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_runs_blocks_without_its_parents_threads():
    # In a fresh process: forking the test runner itself (its own threads, torch's) could leave the
    # child waiting for a lock that one of those threads held at the fork.
    proc = subprocess.run([sys.executable, "-c", _FORKED_CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # 3: the child failed, 4: the parent lost its pool


def test_use_threads_gives_a_blocked_model_worker_threads_and_one_blas_thread():
    before, cv_before = threads.blas_threads(), cv2.getNumThreads()
    cv2.setNumThreads(2)
    blocked, plain = ConvNet((8, 8, 1), [2], [2], 2, conv_algo="blocked"), ConvNet((8, 8, 1), [2], [2], 2)
    try:
        assert threads.use_threads(2, model=blocked) == "2 worker threads (--threads 2)"
        assert threads.workers() == 2 and threads.blas_threads() in (1, None)
        assert threads.use_threads(2, model=plain) == "2 BLAS threads (--threads 2)"
        assert threads.workers() == 1 and threads.blas_threads() in (2, None)
        assert threads.use_threads(3, world_size=2, model=blocked).startswith("3 worker")  # a number is kept
        assert threads.use_threads("auto", world_size=2, model=blocked) == "1 worker thread (--threads auto)"
        assert cv2.getNumThreads() == 1  # OpenCV's pool takes none of the counted CPUs
    finally:
        cv2.setNumThreads(cv_before)
        threads.set_workers(1)
        if before is not None:
            threads.set_blas_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "s.h5")


def test_trainer_sets_the_configured_count_and_says_so(store, tmp_path):
    before = threads.blas_threads()
    said: list[str] = []
    try:
        with Trainer(cfg(store, epochs=1, threads=1), tmp_path / "run", echo=said.append) as t:
            t.fit()
            assert t.threads == 1 and "threads" not in t.config  # not saved: checkpoints of any count agree
            if before is not None:
                assert threads.blas_threads() == 1
        assert any("1 BLAS thread (--threads 1)" in line for line in said)
    finally:
        if before is not None:
            threads.set_blas_threads(before)


def test_bad_threads_config_is_one_error(store, tmp_path):
    with pytest.raises(StreamnnError, match="threads must be"):
        Trainer(cfg(store, threads="many"), tmp_path / "run", verbose=False)


def test_threads_may_change_on_resume(store, tmp_path):
    """Resuming with another --threads is allowed (checkpoints of 0.1.0, without the key, resume as "auto":
    tests/test_release_fixtures.py)."""
    out = tmp_path / "run"
    r = CliRunner().invoke(train_main, [str(store), "--hidden", "8", "--epochs", "1", "--threads", "1",
                                        "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(train_main, ["--out", str(out), "--resume", "--epochs", "2", "--threads", "2"])
    assert r.exit_code == 0 and "threads None -> 2" in r.output and "2 BLAS threads" in r.output, r.output
    assert "threads" not in load_run_config(out / LATEST)
    r = CliRunner().invoke(train_main, [str(store), "--out", str(tmp_path / "x"), "--threads", "zero"])
    assert r.exit_code == 1 and "threads must be" in r.output and "Traceback" not in r.output


def test_same_thread_count_same_run(store, tmp_path):
    """With a fixed count, a rerun is bit-identical (the count is part of the numbers, never the load)."""
    run(cfg(store, epochs=1, threads=1), tmp_path / "a")
    run(cfg(store, epochs=1, threads=1), tmp_path / "b")
    assert_same_run(tmp_path / "a", tmp_path / "b")
