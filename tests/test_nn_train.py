"""The CNN through the whole tool chain: train, exact resume after SIGKILL, eval, predict; shift augmentation."""
from __future__ import annotations

import json
import signal
import subprocess

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from blocking import start_blocked
from streamnn import StreamnnError
from streamnn.run.checkpoint import get, load_checkpoint
from streamnn.cli.eval import main as eval_main
from streamnn.cli.predict import main as predict_main
from streamnn.cli.train import main as train_main
from streamnn.data.loader import Loader
from streamnn.run.writer import read_metrics_csv
from streamnn.data.transforms import Augment, shift_images
from test_train import LATEST, _cli, assert_same_run, make_store

SHAPE = (8, 8, 3)
CNN_ARGS = ["--model", "cnn", "--conv", "4,6", "--hidden", "8", "--dropout", "0.2", "--batch-norm",
            "--augment", "shift", "--shift", "2", "--standardize", "--val-fraction", "0.25",
            "--batch-size", "16", "--lr", "0.01", "--lr-schedule", "cosine", "--weight-decay", "1e-3",
            "--seed", "5", "--checkpoint-every", "1", "-q", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("cnnstore") / "s.h5", shape=SHAPE)


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("cnnref") / "run"
    r = CliRunner().invoke(train_main, [str(store), *CNN_ARGS, "--epochs", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_cnn_learns_and_records_its_architecture(reference):
    ckpt = load_checkpoint(reference / "checkpoint-best.h5")
    model = json.loads(get(ckpt, "model.config"))
    assert model["type"] == "ConvNet" and model["conv"] == [4, 6] and model["batch_norm"] is True
    assert "bn0.mean" in get(ckpt, "model.state")
    assert get(ckpt, "progress.best") > 0.75  # the bands are easy: far above chance
    cfg = json.loads(get(ckpt, "config"))
    assert cfg["augment"] == "shift" and cfg["shift"] == 2


def test_killed_cnn_run_resumes_bit_identical(store, reference, tmp_path):
    args = [str(store), *CNN_ARGS, "--epochs", "3", "--out", str(tmp_path / "killed")]
    proc = start_blocked(_cli(*args), tmp_path / "blocked", STREAMNN_TEST_BLOCK_AT_STEP="5")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference, tmp_path / "killed")


def test_eval_and_predict_a_cnn_with_flip_tta(store, reference, tmp_path):
    r = CliRunner().invoke(eval_main, [str(reference / LATEST), str(store), "--json"])
    assert r.exit_code == 0, r.output
    last = read_metrics_csv(reference / "metrics.csv")[-1]
    assert json.loads(r.output)["accuracy"] == float(last["eval_accuracy"])  # the trainer's own evaluation
    r = CliRunner().invoke(eval_main, [str(reference / LATEST), str(store), "--tta", "flip", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["tta"] == "flip", r.output
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, 4:] = 200  # a band on the right half: the second class
    cv2.imwrite(str(tmp_path / "right.png"), img)
    r = CliRunner().invoke(predict_main, [str(reference / LATEST), str(tmp_path / "right.png"), "--tta", "flip"])
    assert r.exit_code == 0, r.output
    assert r.output.split("\t")[1] in ("cats", "dogs")


def test_cnn_options_are_checked(store, tmp_path):
    for bad in (["--conv", "4,4,4,4"], ["--kernel", "4"], ["--conv", "0"]):
        r = CliRunner().invoke(train_main, [str(store), "--model", "cnn", *bad, "--out", str(tmp_path / "x")])
        assert r.exit_code != 0 and "Error" in r.output and "Traceback" not in r.output, r.output


# -- shift augmentation --------------------------------------------------------------------------
def test_shift_images_moves_pixels_and_pads_by_reflection_or_zeros():
    img = np.arange(5 * 6, dtype=np.float32).reshape(1, 5, 6, 1)
    for padding in ("zero", "reflect"):
        out = img.copy()
        shift_images(out, np.array([[1, -2]]), 2, padding)
        padded = np.pad(img[0, :, :, 0], 2, mode="reflect" if padding == "reflect" else "constant")
        for y in range(5):
            for x in range(6):
                assert out[0, y, x, 0] == padded[y - 1 + 2, x + 2 + 2]  # output (y, x) = input (y - dy, x - dx)
    same = img.copy()
    shift_images(same, np.array([[0, 0]]), 3)
    np.testing.assert_array_equal(same, img)


def test_shift_draws_are_a_function_of_seed_epoch_batch_and_global_row():
    aug = Augment.parse("flip,shift", 3)
    assert aug.spec == "flip,shift=3/reflect" and Augment.parse(aug.spec) == aug
    whole = aug.shifts(7, 2, 5, 8)  # the 8 rows of global batch 5
    np.testing.assert_array_equal(aug.shifts(7, 2, 5, 8, rank=1, world_size=2), whole[1::2])  # rank 1's rows
    assert np.abs(whole).max() <= 3 and not np.array_equal(whole, aug.shifts(7, 3, 5, 8))
    with pytest.raises(StreamnnError):
        Augment.parse("shift=0/reflect")
    with pytest.raises(StreamnnError):
        Augment.parse("rotate")


def test_loader_shift_batches_repeat_after_a_state_restore(store):
    with Loader(store, "train", 16, seed=3, augment="flip,shift", shift=2) as L, \
            Loader(store, "train", 16, seed=3) as plain:
        first = [X.copy() for X, _ in L]
        state = L.state_dict()
        second = [X.copy() for X, _ in L]
        raw = [X.copy() for X, _ in plain]
        assert not np.array_equal(first[0], raw[0])
        assert state["augment"] == "flip,shift=2/reflect"
    with Loader(store, "train", 16, seed=3) as again:  # the state carries the augmentation
        again.load_state_dict(state)
        assert again.augment == "flip,shift=2/reflect"
        resumed = [X.copy() for X, _ in again]
    assert len(resumed) == len(second) and all(np.array_equal(a, b) for a, b in zip(resumed, second))
