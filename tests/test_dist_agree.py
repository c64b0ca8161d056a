"""Ranks agree on what they run before they compute, an error on one rank is printed by that rank
(once), and the per-epoch evaluation reads the run's own store: real ``mpiexec -n 2`` jobs (MPMD
lines for ranks started with other arguments), and an in-process repack between epochs."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpi import run_mpiexec, run_mpmd, run_ranks
from streamnn.dist import SingleComm, agree, canonical_digest
from streamnn.errors import StreamnnError
from streamnn.run.checkpoint import load_checkpoint
from streamnn.run.folder import BEST, LATEST
from streamnn.run.trainer import Trainer
from tinystore import make_store

TRAIN = ["--hidden", "4", "--epochs", "1", "--batch-size", "4", "--dtype", "float64", "-q"]
AGREE = "give every rank the same arguments and the same store"


def train(store, out, *extra):
    return [sys.executable, "-m", "streamnn.cli.train", str(store), "--out", str(out), *TRAIN, *extra]


def evaluate(checkpoint, store, *extra):
    return [sys.executable, "-m", "streamnn.cli.eval", str(checkpoint), str(store), "--json", *extra]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("agree")
    a = make_store(d / "a.h5")
    (d / "node2").mkdir()
    copy = shutil.copy(a, d / "node2" / "a.h5")  # the same store at another path
    other = make_store(d / "other.h5", n_test=8)  # another store (a stale copy), same classes and images
    return a, copy, other


def lines(result):
    return result.stderr.strip().splitlines()


def nothing_written(out):
    return not any((out / name).exists() for name in (LATEST, BEST, "config.json", "metrics.csv"))


@pytest.mark.parametrize("rank1,what", [(("--seed", "1"), "seed"), (("--hidden", "8"), "hidden"),
                                        (("--hidden", "8", "--lr", "0.1"), "hidden, lr"),
                                        ("other", "store fingerprint")])
def test_ranks_started_with_other_arguments_or_store_stop_with_one_line(stores, tmp_path, rank1, what):
    a, _, other = stores
    out = tmp_path / "run"
    second = train(other, out) if rank1 == "other" else train(a, out, *rank1)
    result, seconds = run_mpmd([train(a, out), second])
    assert result.returncode == 1, result.stderr
    verb = "differs" if "," not in what else "differ"
    assert lines(result) == [f"Error: the ranks do not run the same training: {what} {verb} on rank 1 of 2 "
                             f"from rank 0; {AGREE}"]
    assert seconds < 60 and not out.exists()  # the ranks agree before rank 0 makes the folder


def test_the_same_store_at_another_path_trains_and_resume_and_eval_agree_too(stores, tmp_path):
    a, copy, other = stores
    out = tmp_path / "run"
    result, _ = run_mpmd([train(a, out), train(copy, out)])
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(out / LATEST)["progress"]["epoch"] == 1

    # resuming: a rank given another --epochs (a resumable option) stops every rank, nothing saved
    resume = [sys.executable, "-m", "streamnn.cli.train", "--resume", "--out", str(out), "-q"]
    before = (out / LATEST).read_bytes()
    result, _ = run_mpmd([[*resume, "--epochs", "2"], [*resume, "--epochs", "3"]])
    assert result.returncode == 1, result.stderr
    assert lines(result) == [f"Error: the ranks do not run the same training: epochs differs on rank 1 of 2 "
                             f"from rank 0; {AGREE}"]
    assert (out / LATEST).read_bytes() == before

    # evaluation: the same store at two paths gives the one-process numbers; two stores stop
    single, _ = run_mpmd([evaluate(out / BEST, a)])
    two, _ = run_mpmd([evaluate(out / BEST, a), evaluate(out / BEST, copy)])
    assert two.returncode == 0, two.stderr
    want, got = json.loads(single.stdout), json.loads(two.stdout)
    assert got["n"] == want["n"] == 6 and got["accuracy"] == want["accuracy"]
    result, _ = run_mpmd([evaluate(out / BEST, a), evaluate(out / BEST, other)])
    assert result.returncode == 1 and result.stdout == ""
    assert lines(result) == [f"Error: the ranks do not run the same evaluation: store fingerprint differs on rank "
                             f"1 of 2 from rank 0; {AGREE}"]
    result, _ = run_mpmd([evaluate(out / BEST, a), evaluate(out / BEST, a, "--split", "train")])
    assert result.returncode == 1 and "split differs on rank 1 of 2" in result.stderr


@pytest.mark.parametrize("command", ["train", "eval"])
def test_an_error_on_one_rank_only_is_printed_once_by_that_rank(stores, tmp_path, command):
    a, _, _ = stores
    missing = tmp_path / "gone" / "a.h5"
    if command == "train":
        cmds = [train(a, tmp_path / "run"), train(missing, tmp_path / "run")]
    else:
        make = [sys.executable, "-m", "streamnn.cli.train", str(a), "--out", str(tmp_path / "r"), *TRAIN]
        assert run_mpmd([make])[0].returncode == 0
        cmds = [evaluate(tmp_path / "r" / BEST, a), evaluate(tmp_path / "r" / BEST, missing)]
    result, seconds = run_mpmd(cmds)
    assert result.returncode == 1 and result.stdout == ""
    assert lines(result) == [f"Error: rank 1 of 2: {missing}: no such store file"]
    assert seconds < 60


AGREED = """
    import sys
    from streamnn.cli.common import user_errors
    from streamnn.dist import agreed, world
    from streamnn.errors import StreamnnError
    comm = world()
    with user_errors(ranks=True):
        def step():
            message = {"alike": "bad input", "one": "bad" if comm.rank == 1 else "",
                       "different": f"problem {comm.rank}", "oserror": ""}[sys.argv[1]]
            if sys.argv[1] == "oserror" and comm.rank == 0:
                open("/nonexistent-dir/x")
            if message:
                raise StreamnnError(message)
        agreed(comm, step)
    print("went on", comm.rank)
"""


@pytest.mark.parametrize("mode,expected", [
    ("alike", ["Error: bad input"]),
    ("one", ["Error: rank 1 of 2: bad"]),
    ("different", ["Error: problem 0", "Error: rank 1 of 2: problem 1"]),  # rank 0 speaks for the job
    ("oserror", ["Error: /nonexistent-dir/x: No such file or directory"])])
def test_an_agreed_error_is_printed_once_per_distinct_error_by_a_rank_that_has_it(mode, expected):
    result, _ = run_ranks(2, AGREED, mode)
    assert result.returncode == 1 and result.stdout == ""
    assert sorted(lines(result)) == expected


def test_an_unexpected_exception_on_one_rank_ends_the_job_at_once():
    code = """
        from streamnn.cli.common import user_errors
        from streamnn.dist import world
        comm = world()
        with user_errors(ranks=True):
            if comm.rank == 1:
                raise ValueError("a bug")
            comm.barrier()
    """
    result, seconds = run_ranks(2, code, env={"STREAMNN_MPI_TIMEOUT": "120"})
    assert result.returncode != 0 and seconds < 60
    assert "Error: rank 1 of 2: unexpected error" in result.stderr and "ValueError: a bug" in result.stderr


def test_errors_every_rank_meets_before_computing_are_printed_once(tmp_path, stores):
    a, _, _ = stores
    shim = tmp_path / "shim" / "mpi4py"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no mpi4py here')\n")
    (tmp_path / "src").mkdir()
    for cmd in ([sys.executable, "-m", "streamnn.cli.pack", str(tmp_path / "src"), "-o", str(tmp_path / "p.h5")],
                train(a, tmp_path / "run"), evaluate(tmp_path / "x.h5", a)):
        result, _ = run_mpiexec(2, cmd, env={"PYTHONPATH": str(shim.parent)})
        assert result.returncode == 1
        assert len(lines(result)) == 1 and "mpi4py is not installed" in result.stderr, result.stderr
    result, _ = run_mpiexec(2, [sys.executable, "-m", "streamnn.cli.pack", str(tmp_path / "src"), "-o",
                                str(tmp_path / "p.h5"), "--classes", " "])
    assert result.returncode == 1 and lines(result) == ["Error: --classes is empty; give comma-separated class names"]


# -- the per-epoch evaluation reads the run's own store ------------------------------------------------
@pytest.mark.parametrize("replacement", ["copy", "other"])
def test_a_store_repacked_during_training_is_not_evaluated(tmp_path, replacement):
    store = make_store(tmp_path / "s.h5")
    fresh = make_store(tmp_path / "fresh.h5", n_test=6 if replacement == "copy" else 8)
    out = tmp_path / "run"

    def repack(t):
        if t.step == 1:  # during epoch 1: the store path now holds another file
            os.replace(fresh, store)

    with Trainer({"store": str(store), "hidden": [4], "epochs": 2, "batch_size": 4, "val_fraction": 0.25},
                 out, verbose=False) as t:
        # the training reader sees it at its next batch; the evaluation checks the run's store identity too
        with pytest.raises(StreamnnError, match="changed while it was being read|replaced or changed during this run") as info:
            t.fit(on_step=repack)
    assert str(store) in str(info.value) and "\n" not in str(info.value)
    assert not (out / BEST).exists() and not (out / LATEST).exists()


def test_an_unchanged_store_is_evaluated_every_epoch(tmp_path):
    store = make_store(tmp_path / "s.h5")
    with Trainer({"store": str(store), "hidden": [4], "epochs": 2, "batch_size": 4}, tmp_path / "run",
                 verbose=False) as t:
        history = t.fit()
    assert len(history["eval_accuracy"]) == 2 and (tmp_path / "run" / BEST).is_file()


# -- the digest the ranks compare ------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=12)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(), json_values, max_size=6), st.randoms())
def test_the_digest_is_canonical_and_single_process_agreement_is_free(config, random):
    items = list(config.items())
    random.shuffle(items)
    assert canonical_digest(dict(items)) == canonical_digest(config)
    assert canonical_digest({**config, "\x00extra": 1}) != canonical_digest(config)
    agree(SingleComm(), "training", config)  # one process: nothing to compare, no collective


def test_the_digest_tells_numpy_values_apart():
    a = np.arange(4, dtype=np.float64)
    assert canonical_digest([a]) == canonical_digest([a.copy()])
    assert canonical_digest([a]) != canonical_digest([a.astype(np.float32)])
    assert canonical_digest([a]) != canonical_digest([a[::-1].copy()])
    assert canonical_digest({"x": np.int64(3)}) == canonical_digest({"x": 3})


@pytest.mark.parametrize("command,args", [("train", ["--epochs", "x"]), ("eval", []), ("pack", ["src"])])
def test_a_usage_error_is_printed_once_under_mpiexec(tmp_path, command, args):
    cmd = [sys.executable, "-m", f"streamnn.cli.{command}", *args]
    result, _ = run_mpmd([cmd, cmd], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("Error: ") == 1 and result.stderr.count("Usage: ") == 1, result.stderr
