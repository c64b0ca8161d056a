"""Data-parallel training on real ``mpiexec -n 2`` jobs: the same run as one process, resumes on any
number of ranks, signals and dead ranks."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from mpi import run_mpiexec, run_ranks
from streamnn import StoreWriter
from streamnn.run.checkpoint import load_checkpoint
from streamnn.run.folder import LATEST
from streamnn.run.stop import TrainingInterrupted
from streamnn.run.trainer import Trainer
from blocking import BLOCKER

# 36 training rows after validation (uneven last batch of 1 row: one rank has none), an odd
# global batch (unequal shares), dropout, flips and shifts, L2, a cosine schedule.
CONFIG = {"hidden": [6], "epochs": 3, "batch_size": 7, "val_fraction": 0.2, "dropout": 0.3, "augment": "flip,shift",
          "shift": 1, "weight_decay": 0.05, "optimizer": "adam", "lr": 0.02, "lr_schedule": "cosine",
          "standardize": True, "eval_split": "none", "seed": 5}

JOB = """
    import hashlib, json, sys
    import numpy as np
    from streamnn.dist import world
    from streamnn.run.stop import TrainingInterrupted
    from streamnn.run.trainer import Trainer
    cfg, out, stop, resume, record = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    comm = world()
    digests = []

    def hook(t):
        digests.append(hashlib.sha256(t.model.flat_params.tobytes()).hexdigest())
        if t.step == stop:
            t.request_stop()

    with (Trainer.resume(out, verbose=False, comm=comm) if resume == "resume" else
          Trainer(cfg, out, verbose=False, comm=comm)) as t:
        try:
            t.fit(on_step=hook)
        except TrainingInterrupted:
            pass
        np.save(f"{record}/params{comm.rank}.npy", t.model.flat_params)
    with open(f"{record}/digests{comm.rank}.json", "w") as f:
        json.dump(digests, f)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "s.h5"
    rng = np.random.default_rng(1)
    n, shape = 45, (4, 4, 3)
    labels = rng.integers(0, 2, n)
    px = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    px[labels == 1, :2] //= 3  # something to learn
    with StoreWriter(path, class_names=["a", "b"], image_shape=shape) as w:
        w.add_split("train", n)
        w.write_rows("train", px, labels, [f"r{i}" for i in range(n)])
        w.set_stats(px.reshape(n, -1).mean(0) / 255, px.reshape(n, -1).std(0) / 255 + 0.01)
        w.commit()
    return path


def job(tmp_path, name, config, out, *, stop=0, resume=False, ranks=2):
    """Run JOB on ``ranks`` ranks; returns (params of rank 0, digests of every rank per step)."""
    record = tmp_path / name
    record.mkdir()
    result, _ = run_ranks(ranks, JOB, json.dumps(config), str(out), str(stop), "resume" if resume else "new",
                          str(record))
    assert result.returncode == 0, result.stderr
    params = [np.load(record / f"params{r}.npy") for r in range(ranks)]
    digests = [json.loads((record / f"digests{r}.json").read_text()) for r in range(ranks)]
    assert all(np.array_equal(p, params[0]) for p in params) and all(d == digests[0] for d in digests)
    return params[0], digests[0]


def one_process(config, out, stop=0, resume=False):
    with (Trainer.resume(out, verbose=False) if resume else Trainer(config, out, verbose=False)) as t:
        with pytest.raises(TrainingInterrupted) if stop else _nothing():
            t.fit(on_step=lambda tr: tr.step == stop and tr.request_stop())
        return t.model.flat_params.copy()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_two_ranks_train_the_one_process_run_and_resume_on_any_number(store, tmp_path):
    cfg = {**CONFIG, "store": str(store), "dtype": "float64"}
    single = one_process(cfg, tmp_path / "one")
    straight, digests = job(tmp_path, "straight", cfg, tmp_path / "two")
    assert len(digests) == 18 and len(set(digests)) == 18  # 6 steps an epoch; ranks equal at every step
    np.testing.assert_allclose(straight, single, rtol=1e-10, atol=1e-13)

    # same K: stopped at step 5, resumed on 2 ranks -> bit-identical to the uninterrupted 2-rank run
    job(tmp_path, "stop", cfg, tmp_path / "b", stop=5)
    assert load_checkpoint(tmp_path / "b" / LATEST)["progress"]["step"] == 5
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    resumed, digests_b = job(tmp_path, "resume", cfg, tmp_path / "b", resume=True)
    assert np.array_equal(resumed, straight) and digests_b == digests[5:]

    # elastic: 2 ranks -> 1 process (stops at step 10) -> 2 ranks, equal to the uninterrupted run
    one_process(cfg, tmp_path / "c", stop=10, resume=True)
    assert load_checkpoint(tmp_path / "c" / LATEST)["loader"]["samples"] == 28  # 4 batches of 7 into epoch 2
    elastic, _ = job(tmp_path, "elastic", cfg, tmp_path / "c", resume=True)
    np.testing.assert_allclose(elastic, single, rtol=1e-10, atol=1e-13)
    for name in ("one", "two", "c"):
        assert (tmp_path / name / "metrics.csv").is_file()
    rows = [(tmp_path / n / "metrics.csv").read_text().splitlines() for n in ("one", "c")]
    for a, b in zip(*rows[:2]):
        assert a.split(",")[:3] == b.split(",")[:3]  # epoch, step, lr


def test_float32_ranks_equal_one_process_to_1e_5(store, tmp_path):
    cfg = {**CONFIG, "store": str(store), "dtype": "float32", "epochs": 1}
    single = one_process(cfg, tmp_path / "one")
    two, _ = job(tmp_path, "two", cfg, tmp_path / "two")
    np.testing.assert_allclose(two, single, rtol=1e-5, atol=1e-6)


CLI = ["--hidden", "6", "--epochs", "2", "--batch-size", "7", "--eval-split", "none", "--dtype", "float64",
       "--checkpoint-every", "2", "--seed", "2", "-q"]


def train_cmd(store, out, *extra):
    return [sys.executable, "-m", "streamnn.cli.train", str(store), "--out", str(out), *CLI, *extra]


def signalled(rank_step_signal):
    return {"PYTHONPATH": str(BLOCKER), "STREAMNN_TEST_SIGNAL_AT": rank_step_signal}


def test_sigterm_to_one_rank_stops_every_rank_at_one_step(store, tmp_path):
    result, _ = run_mpiexec(2, train_cmd(store, tmp_path / "run"), env=signalled("1:3:TERM"))
    assert result.returncode == 143, result.stderr
    assert result.stderr.count("SIGTERM: stopped at step 4 (epoch 1)") == 1, result.stderr  # rank 0 reports
    assert load_checkpoint(tmp_path / "run" / LATEST)["progress"]["step"] == 4
    assert (tmp_path / "run" / "steps.csv").read_text().splitlines()[-1].startswith("4,")
    again, _ = run_mpiexec(2, [sys.executable, "-m", "streamnn.cli.train", "--resume", "--out", str(tmp_path / "run"),
                               "-q"])
    assert again.returncode == 0, again.stderr
    assert load_checkpoint(tmp_path / "run" / LATEST)["progress"]["epoch"] == 2


def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_resumes(store, tmp_path):
    out = tmp_path / "run"
    result, seconds = run_mpiexec(2, train_cmd(store, out), env=signalled("1:5:KILL"), timeout=120)
    assert result.returncode != 0 and seconds < 60
    content = load_checkpoint(out / LATEST)  # intact: the step-4 checkpoint (checkpoint-every 2)
    assert content["progress"]["step"] == 4
    with Trainer.resume(out, verbose=False) as t:  # what the README says to run next, on any number of ranks
        t.fit()
        assert t.step == 14  # 2 epochs of 7 steps (45 rows, batch 7)


def test_batch_norm_is_refused_under_mpiexec_with_one_line(store, tmp_path):
    result, _ = run_mpiexec(2, train_cmd(store, tmp_path / "bn", "--model", "cnn", "--conv", "4", "--batch-norm"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: --batch-norm is not data-parallel here (each rank would normalize its share with its own statistics, "
        "unlike one process): train it without mpiexec"]
    assert not (tmp_path / "bn" / LATEST).exists()
