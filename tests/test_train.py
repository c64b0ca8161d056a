"""Training: outputs, learning, exact resume (in-process and killed subprocesses), signals, bad checkpoints."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from blocking import start_blocked
from streamnn import StoreWriter, StreamnnError
from streamnn.atomic import TMP_PREFIX
from streamnn.run.checkpoint import differences, digest, get, load_checkpoint, save_checkpoint
from streamnn.cli.train import main as train_main
from streamnn.run.selection import split_validation
from streamnn.run.folder import BEST, LATEST, LOCK_FILE, run_lock
from streamnn.run.stop import TrainingInterrupted
from streamnn.run.trainer import Trainer

SHAPE = (6, 6, 3)


def make_store(path: Path, n_train: int = 64, n_test: int = 32, seed: int = 0, classes=("cats", "dogs"),
               shape=SHAPE) -> Path:
    """A learnable synthetic store: class k has a bright vertical band k, plus noise."""
    rng = np.random.default_rng(seed)
    k_cls, (h, w, c) = len(classes), shape

    def data(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % k_cls)
        px = rng.integers(0, 120, (n, h, w, c))
        for k in range(k_cls):
            px[y == k, :, k * w // k_cls:(k + 1) * w // k_cls] += 110
        return px.astype(np.uint8), y

    with StoreWriter(path, class_names=list(classes), image_shape=shape, options={"size": [h, w]}) as wr:
        for split, n in (("train", n_train), ("test", n_test)):
            px, y = data(n)
            wr.add_split(split, n)
            wr.write_rows(split, px, y, [f"{split}/{classes[k]}/{i}.jpg" for i, k in enumerate(y)])
            if split == "train":
                rows = px.reshape(n, -1) / 255.0
                wr.set_stats(rows.mean(0), rows.std(0))
        wr.commit()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s.h5")


# Everything that consumes randomness or state: dropout, flips, validation split, Adam, a schedule.
RESUME_CFG = dict(epochs=3, hidden=[8], batch_size=16, eval_batch_size=8, val_fraction=0.25, dropout=0.2,
                  augment="flip", standardize=True, optimizer="adam", lr=0.01, lr_schedule="hyperbolic",
                  checkpoint_every=2, seed=3)


def cfg(store: Path, **kw) -> dict:
    return {"store": str(store), **RESUME_CFG, **kw}


def run(config: dict, out: Path, **kw) -> Trainer:
    with Trainer(config, out, verbose=False) as t:
        t.fit(**kw)
    return t


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / LATEST), load_checkpoint(b / LATEST)
    assert differences(ca, cb) == []
    assert (a / LATEST).read_bytes() == (b / LATEST).read_bytes()
    assert digest(load_checkpoint(a / BEST)) == digest(load_checkpoint(b / BEST))
    for name in ("metrics.csv", "steps.csv", "config.json"):
        assert (a / name).read_text() == (b / name).read_text(), name
    assert not [p for p in os.listdir(b) if p.startswith(".streamnn-tmp-")]


@pytest.fixture(scope="module")
def straight(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    run(cfg(store), out)
    return out


def test_end_to_end_outputs(straight):
    assert sorted(os.listdir(straight)) == sorted([LATEST, BEST, "metrics.csv", "steps.csv", "curves.png",
                                                   "config.json", LOCK_FILE])
    rows = list(csv.DictReader(open(straight / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[-1]["step"] == "9"  # 48 train rows / 16
    assert all(r["val_accuracy"] and r["eval_accuracy"] and r["train_loss"] for r in rows)
    steps = (straight / "steps.csv").read_text().splitlines()
    assert steps[0] == "step,epoch,loss" and len(steps) == 10 and steps[-1].startswith("9,3,")
    assert (straight / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((straight / "config.json").read_text())
    assert config["hidden"] == [8] and config["eval_split"] == "test" and "streamnn_version" in config
    ck = load_checkpoint(straight / LATEST)
    assert ck["progress"]["epoch"] == 3 and ck["progress"]["selection"] == "val"
    assert ck["data"]["class_names"] == ["cats", "dogs"] and ck["data"]["standardize"] is True
    assert ck["data"]["mean"].shape == (108,) and json.loads(ck["data"]["options"]) == {"size": [6, 6]}
    best = load_checkpoint(straight / BEST)
    assert best["progress"]["epoch"] == best["progress"]["best_epoch"]


def test_learns_a_learnable_store_well_above_chance(store, tmp_path):
    t = run({"store": str(store), "epochs": 8, "hidden": [16], "lr": 0.01, "batch_size": 16,
             "standardize": True}, tmp_path)
    assert t.history["eval_accuracy"][-1] >= 0.85 and t.history["train_accuracy"][-1] >= 0.85
    lg = run({"store": str(store), "model": "logistic", "epochs": 8, "lr": 0.05, "batch_size": 16,
              "standardize": True, "optimizer": "sgd"}, tmp_path / "logistic")
    assert lg.history["eval_accuracy"][-1] >= 0.85


def test_more_than_two_classes_use_softmax_and_evaluate(tmp_path):
    from streamnn.cli.eval import main as eval_main

    store = make_store(tmp_path / "abc.h5", n_train=90, n_test=30, classes=("a", "b", "c"))
    t = run({"store": str(store), "epochs": 6, "hidden": [16], "lr": 0.01, "batch_size": 16,
             "standardize": True, "val_fraction": 0.2}, tmp_path / "run")
    assert t.model.config()["activation_func"][-1] == "softmax" and t.history["eval_accuracy"][-1] > 0.6
    r = CliRunner().invoke(eval_main, [str(tmp_path / "run" / LATEST), str(store), "--json"])
    report = json.loads(r.output)
    assert np.array(report["confusion"]).shape == (3, 3) and report["accuracy"] == t.history["eval_accuracy"][-1]
    with pytest.raises(StreamnnError, match="logistic regression is binary"):
        Trainer({"store": str(store), "model": "logistic"}, tmp_path / "lr")


def test_validation_split_is_seeded_stratified_and_disjoint():
    labels = np.array([0] * 30 + [1] * 10)
    tr, va = split_validation(labels, 0.2, seed=1)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 40
    assert np.bincount(labels[va]).tolist() == [6, 2]
    assert np.array_equal(va, split_validation(labels, 0.2, seed=1)[1])
    assert not np.array_equal(va, split_validation(labels, 0.2, seed=2)[1])


def _stop_at(step: int):
    def hook(t: Trainer) -> None:
        if t.step == step:
            t.request_stop(signal.SIGINT)
    return hook


@pytest.mark.parametrize("stops", [[1], [3], [5, 6], [8, 9]], ids=["first", "epoch-end", "twice", "last-steps"])
def test_interrupted_and_resumed_run_is_bit_identical(store, straight, tmp_path, stops):
    out = tmp_path / "run"
    Trainer(cfg(store), out, verbose=False).close()
    for i, stop in enumerate(stops):
        t = Trainer(cfg(store), out, verbose=False) if i == 0 else Trainer.resume(out, verbose=False)
        with t, pytest.raises(TrainingInterrupted) as exc:
            t.fit(on_step=_stop_at(stop))
        assert exc.value.step == stop and exc.value.exit_code == 130
        assert load_checkpoint(out / LATEST)["progress"]["step"] == stop
        steps = (out / "steps.csv").read_text().splitlines()
        assert steps[-1].startswith(f"{stop},")
    with Trainer.resume(out, verbose=False) as t:
        t.fit()
    assert_same_run(straight, out)


def test_stop_during_epoch_end_evaluation_resumes_exactly(store, straight, tmp_path):
    out = tmp_path / "run"
    t = Trainer(cfg(store), out, verbose=False)
    original = t.preprocess

    def stopping_preprocess():
        if t.epoch == 1:  # the second epoch-end evaluation sees the stop before its first batch
            t.request_stop(signal.SIGTERM)
        return original()

    t.preprocess = stopping_preprocess
    with t, pytest.raises(TrainingInterrupted) as exc:
        t.fit()
    assert exc.value.exit_code == 143 and exc.value.step == 6
    saved = load_checkpoint(out / LATEST)["progress"]
    assert (saved["epoch"], saved["epoch_step"]) == (1, 3)  # all steps of epoch 2 done, epoch end pending
    with Trainer.resume(out, verbose=False) as t2:
        t2.fit()
    assert_same_run(straight, out)


def test_crash_between_checkpoints_resumes_from_the_last_one(store, straight, tmp_path):
    class Crash(Exception):
        pass

    def crash(t: Trainer) -> None:
        if t.step == 5:
            raise Crash

    out = tmp_path / "run"
    with Trainer(cfg(store), out, verbose=False) as t, pytest.raises(Crash):
        t.fit(on_step=crash)
    assert load_checkpoint(out / LATEST)["progress"]["step"] == 4  # checkpoint_every=2
    with open(out / "steps.csv", "a") as f:
        f.write("6,2,0.69")  # a torn line, as a kill during a write leaves
    with Trainer.resume(out, verbose=False) as t:
        t.fit()
    assert_same_run(straight, out)


def test_sigint_sets_a_flag_and_the_step_finishes(store, tmp_path):
    def hook(t: Trainer) -> None:
        if t.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with Trainer(cfg(store, checkpoint_every=0), tmp_path, verbose=False) as t, \
            pytest.raises(TrainingInterrupted) as exc:
        t.fit(on_step=hook)
    assert exc.value.signum == signal.SIGINT and exc.value.step == 2
    assert signal.getsignal(signal.SIGINT) is before
    assert load_checkpoint(tmp_path / LATEST)["progress"]["step"] == 2


def _state_digest(t: Trainer) -> str:
    return digest(t.state())


def test_bad_checkpoints_are_refused_and_leave_the_trainer_untouched(store, straight, tmp_path):
    other_store = make_store(tmp_path / "other.h5", seed=9)
    run(cfg(other_store, epochs=1), tmp_path / "other")
    run(cfg(store, epochs=1, hidden=[4]), tmp_path / "narrow")
    good = load_checkpoint(straight / LATEST)
    reshaped = {**good, "model": {**good["model"], "state": {**good["model"]["state"], "W0": np.zeros((3, 3))}}}
    save_checkpoint(tmp_path / "reshaped.h5", reshaped)
    data = (straight / LATEST).read_bytes()
    (tmp_path / "truncated.h5").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.h5").write_text("hello")
    cases = {
        tmp_path / "other" / LATEST: "another store",
        tmp_path / "narrow" / LATEST: "another architecture",
        tmp_path / "reshaped.h5": "",
        tmp_path / "truncated.h5": "truncated",
        tmp_path / "text.h5": "not an HDF5 file",
        store: "not a streamnn checkpoint",
        tmp_path / "missing.h5": "no such checkpoint",
    }
    with Trainer(cfg(store), tmp_path / "victim", verbose=False) as t, pytest.raises(TrainingInterrupted):
        t.fit(on_step=lambda tr: tr.step == 4 and tr.request_stop())
    with Trainer.resume(tmp_path / "victim", verbose=False) as t:
        before = _state_digest(t)
        for path, message in cases.items():
            with pytest.raises(StreamnnError) as err:
                t.load(path)
            assert message in str(err.value) and "\n" not in str(err.value) and str(path) in str(err.value)
            assert _state_digest(t) == before, path
        t.fit()
    assert_same_run(straight, tmp_path / "victim")


# -- command line -----------------------------------------------------------------------------
CLI_ARGS = ["--hidden", "8", "--epochs", "3", "--batch-size", "16", "--val-fraction", "0.25", "--dropout", "0.2",
            "--augment", "flip", "--standardize", "--optimizer", "adam", "--lr", "0.01", "--lr-schedule",
            "hyperbolic", "--checkpoint-every", "1", "--seed", "3"]


def test_help_of_every_command():
    from streamnn.cli.eval import main as eval_main
    from streamnn.cli.predict import main as predict_main

    for command in (train_main, eval_main, predict_main):
        result = CliRunner().invoke(command, ["--help"])
        assert result.exit_code == 0 and "Usage" in result.output
    text = CliRunner().invoke(train_main, ["--help"]).output
    for flag in ("--model", "--hidden", "--activation", "--optimizer", "--lr", "--lr-schedule", "--lr-decay",
                 "--epochs", "--batch-size", "--weight-decay", "--dropout", "--standardize", "--augment",
                 "--val-fraction", "--dtype", "--seed", "--eval-split", "--out", "--resume", "--checkpoint-every"):
        assert flag in text


def test_cli_trains_refuses_overwrite_and_checks_resume_options(store, tmp_path):
    out = str(tmp_path / "run")
    r = CliRunner().invoke(train_main, [str(store), *CLI_ARGS, "--epochs", "1", "--out", out])
    assert r.exit_code == 0, r.output
    assert "epoch 1/1" in r.output and "selected on the validation part" in r.output
    assert "test accuracy" in r.output and "not used for selection" in r.output
    r = CliRunner().invoke(train_main, [str(store), "--out", out])
    assert r.exit_code == 1 and "add --resume" in r.output
    r = CliRunner().invoke(train_main, [str(store), "--out", out, "--resume", "--lr", "0.5"])
    assert r.exit_code == 1 and "cannot change --lr 0.5 (saved: 0.01)" in r.output
    r = CliRunner().invoke(train_main, [str(store), *CLI_ARGS, "--out", out, "--resume"])  # same options: fine
    assert r.exit_code == 0 and "epochs 1 -> 3" in r.output and "epoch 3/3" in r.output, r.output
    r = CliRunner().invoke(train_main, ["--out", out, "--resume"])
    assert r.exit_code == 0 and "nothing to do" in r.output
    r = CliRunner().invoke(train_main, ["--out", str(tmp_path / "none"), "--resume"])
    assert r.exit_code == 1 and "nothing to resume" in r.output
    r = CliRunner().invoke(train_main, [str(store), "--out", str(tmp_path / "x"), "--eval-split", "valid"])
    assert r.exit_code == 1 and "no 'valid' split" in r.output


def test_cli_force_starts_a_new_run_from_scratch(store, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(train_main, [str(store), *CLI_ARGS, "--epochs", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    (out / "steps.csv").write_text("step,epoch,loss\n999,9,0.1\n")  # would survive if not replaced
    r = CliRunner().invoke(train_main, [str(store), *CLI_ARGS, "--epochs", "1", "--out", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert "999," not in (out / "steps.csv").read_text()
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # header + the one new epoch
    r = CliRunner().invoke(train_main, [str(store), "--out", str(out), "--force", "--resume"])
    assert r.exit_code == 2 and "exclude each other" in r.output


def test_a_folder_in_use_by_another_run_is_refused_untouched(store, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(train_main, [str(store), *CLI_ARGS, "--epochs", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    def files():
        return {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_FILE}

    before = files()
    with run_lock(out):  # as if another streamnn-train were running there
        for args in ([str(store), *CLI_ARGS, "--out", str(out), "--force"],
                     ["--out", str(out), "--resume", "--epochs", "2"]):
            r = CliRunner().invoke(train_main, args)
            assert r.exit_code == 1 and f"another training run is using this folder (pid {os.getpid()})" in r.output
        with pytest.raises(StreamnnError, match="another training run"):
            Trainer(cfg(store), tmp_path / "run", verbose=False).fit()
        assert files() == before
    r = CliRunner().invoke(train_main, [str(store), *CLI_ARGS, "--epochs", "2", "--out", str(out), "--resume"])
    assert r.exit_code == 0 and "epoch 2/2" in r.output, r.output  # released with its holder


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamnn.cli.train", *args]


@pytest.mark.parametrize("sig,block,stopped_at", [
    (signal.SIGKILL, {"STREAMNN_TEST_BLOCK_AT_STEP": "4"}, 4),     # between two steps
    (signal.SIGKILL, {"STREAMNN_TEST_BLOCK_IN_SAVE": "6"}, None),  # half-way through writing a checkpoint
    (signal.SIGTERM, {"STREAMNN_TEST_BLOCK_AT_STEP": "8"}, 9),     # the step under way ends and is saved
])
def test_killed_subprocess_resumes_bit_identical(store, tmp_path, sig, block, stopped_at):
    args = [str(store), *CLI_ARGS, "--epochs", "10", "-q"]  # 30 steps, a checkpoint after each
    reference = tmp_path / "reference"
    assert CliRunner().invoke(train_main, [*args, "--out", str(reference)]).exit_code == 0
    out = tmp_path / "killed"
    proc = start_blocked(_cli(*args, "--out", str(out)), tmp_path / "blocked", **block)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), err
    if sig == signal.SIGTERM:
        assert f"SIGTERM: stopped at step {stopped_at}" in err and "--resume" in err
    latest = load_checkpoint(out / LATEST)  # the last complete checkpoint
    if stopped_at is not None:
        assert get(latest, "progress.step") == stopped_at
    else:  # the killed write left its temporary file; the checkpoint before it is intact
        assert [p for p in os.listdir(out) if p.startswith(TMP_PREFIX)]
    resumed = subprocess.run(_cli(*args, "--out", str(out), "--resume"), capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference, out)
