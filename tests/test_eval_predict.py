"""Metrics, and streamnn-eval / streamnn-predict: agreement with the training loop, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from streamnn import StoreWriter
from streamnn.cli.eval import main as eval_main
from streamnn.cli.predict import main as predict_main
from streamnn.data.transforms import Preprocess, flip_columns
from streamnn.run.predict import load_model, predict_proba
from streamnn.run.metrics import Metrics, class_probabilities, confusion_matrix, precision_recall
from streamnn.run.folder import BEST, LATEST
from streamnn.run.trainer import Trainer

SHAPE = (8, 8, 3)


def _write_photos(folder: Path, n: int, seed: int) -> None:
    """Learnable JPEG 'photos' of assorted sizes: dogs are redder on the left, cats bluer on the right."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        k = i % 2
        h, w = rng.integers(70, 120, 2)
        img = rng.integers(0, 140, (h, w, 3)).astype(np.uint8)
        if k:
            img[:, : w // 2, 2] += 110
        else:
            img[:, w // 2:, 0] += 110
        p = folder / ("dogs" if k else "cats") / f"{i:03d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), img)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """JPEG files in the Kaggle layout, packed by streamnn.pack (reduced decoding, INTER_AREA), and a run."""
    from streamnn.pack import pack

    root = tmp_path_factory.mktemp("eval")
    _write_photos(root / "photos" / "training_set", 64, 0)
    _write_photos(root / "photos" / "test_set", 24, 1)
    store = root / "s.h5"
    pack(root / "photos", store, size=SHAPE[:2], workers=1)
    out = root / "run"
    with Trainer({"store": str(store), "epochs": 4, "hidden": [8], "lr": 0.02, "batch_size": 16,
                  "standardize": True, "augment": "flip", "seed": 1}, out, verbose=False) as t:
        t.fit()
    return {"root": root / "photos", "store": store, "out": out, "history": t.history,
            "files": {"test": sorted((root / "photos" / "test_set").rglob("*.jpg"))}}


def test_eval_json_agrees_with_the_training_loop(dataset):
    r = CliRunner().invoke(eval_main, [str(dataset["out"] / LATEST), str(dataset["store"]), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    h = dataset["history"]
    assert s["accuracy"] == h["eval_accuracy"][-1] and s["loss"] == h["eval_loss"][-1]
    assert s["n"] == 24 and sum(map(sum, s["confusion"])) == 24 and s["same_store_as_training"]
    cm = np.array(s["confusion"])
    assert s["per_class"]["dogs"]["recall"] == cm[1, 1] / cm[1].sum()
    assert s["per_class"]["cats"]["precision"] == cm[0, 0] / cm[:, 0].sum()
    assert s["accuracy"] >= 0.75


def test_eval_text_report_tta_and_errors_grid(dataset, tmp_path):
    with Trainer({"store": str(dataset["store"]), "epochs": 1, "hidden": [4], "lr": 1e-7}, tmp_path / "weak",
                 verbose=False) as t:  # an untrained model: errors guaranteed
        t.fit()
    png = tmp_path / "errors.png"
    r = CliRunner().invoke(eval_main, [str(tmp_path / "weak" / BEST), str(dataset["store"]), "--tta", "flip",
                                       "--errors", str(png), "--max-errors", "4"])
    assert r.exit_code == 0, r.output
    assert "precision" in r.output and "confusion matrix" in r.output and "flip TTA" in r.output
    assert "grid of the first ones" in r.output and png.read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(eval_main, [str(dataset["out"] / BEST), str(dataset["store"])])
    assert r.exit_code == 0 and "grid" not in r.output


def test_eval_refuses_unknown_split_and_mismatched_store(dataset, tmp_path):
    r = CliRunner().invoke(eval_main, [str(dataset["out"] / LATEST), str(dataset["store"]), "--split", "valid"])
    assert r.exit_code == 1 and "unknown split 'valid'" in r.output
    other = tmp_path / "other.h5"
    with StoreWriter(other, class_names=["a", "b", "c"], image_shape=SHAPE) as w:
        w.add_split("test", 3)
        w.write_rows("test", np.zeros((3, *SHAPE), np.uint8), [0, 1, 2], ["x", "y", "z"])
        w.commit()
    r = CliRunner().invoke(eval_main, [str(dataset["out"] / LATEST), str(other)])
    assert r.exit_code == 1 and "classes" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(eval_main, [str(other), str(dataset["store"])])
    assert r.exit_code == 1 and "not a streamnn checkpoint" in r.output


def test_predict_matches_store_rows_and_reports_bad_files(dataset, tmp_path):
    ckpt = dataset["out"] / LATEST
    pred = load_model(ckpt)
    assert pred.prep.standardize
    test_files = dataset["files"]["test"]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    r = CliRunner().invoke(predict_main, [str(ckpt), str(dataset["root"] / "test_set"), str(bad), "--json"])
    assert r.exit_code == 1
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(d["path"]) for d in lines] == sorted(test_files)
    assert "broken.jpg" in r.stderr and "1 of 25 images could not be read" in r.stderr
    # the same probabilities as the store rows through the evaluation path
    from streamnn.data.store import open_store

    with open_store(dataset["store"]) as s:
        X = s.read_rows("test", range(24)).T.copy()
        rel = s.paths("test")
        assert s.options["reduced_decoding"] is True
    P = predict_proba(pred.model, pred.prep, X)[0]
    by_name = {Path(d["path"]).as_posix(): d["probabilities"]["dogs"] for d in lines}
    mine = [next(v for k, v in by_name.items() if k.endswith("/" + r)) for r in rel]
    np.testing.assert_allclose(mine, P, rtol=1e-5, atol=1e-7)
    r = CliRunner().invoke(predict_main, [str(ckpt), str(test_files[0])])
    assert r.exit_code == 0 and r.stdout.count("\t") == 2


def test_predict_with_nothing_readable_fails(dataset, tmp_path):
    r = CliRunner().invoke(predict_main, [str(dataset["out"] / LATEST), str(tmp_path)])
    assert r.exit_code == 1 and f"Error: {tmp_path}: no image file found" in r.output


def test_flip_tta_is_symmetric():
    rng = np.random.default_rng(0)
    X = rng.random((int(np.prod(SHAPE)), 5)).astype(np.float32)
    Xf = flip_columns(X, SHAPE)
    assert np.array_equal(flip_columns(Xf, SHAPE), X)
    assert np.array_equal(Xf.reshape(*SHAPE, 5)[:, 0], X.reshape(*SHAPE, 5)[:, -1])

    class Linear:
        params = {"W0": np.zeros(1, np.float32)}
        w = rng.standard_normal(X.shape[0]).astype(np.float32)

        def predict_proba(self, Z):
            return 1 / (1 + np.exp(-(self.w @ Z)))[None, :]

    prep = Preprocess(SHAPE, np.full(X.shape[0], 0.5), np.full(X.shape[0], 0.2))
    np.testing.assert_allclose(predict_proba(Linear(), prep, X, tta=True),
                               predict_proba(Linear(), prep, Xf, tta=True), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(2, 4), cuts=st.lists(st.integers(0, 40), max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_streaming_metrics_equal_one_pass(n, k, cuts, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    P = rng.dirichlet(np.ones(k), n).T if k > 2 else rng.random((1, n))
    Y = np.eye(k)[labels].T if k > 2 else labels[None, :].astype(np.float32)
    whole, parts = Metrics(k), Metrics(k)
    whole.update(P, Y)
    bounds = sorted({0, n, *[c for c in cuts if c <= n]})
    for a, b in zip(bounds, bounds[1:]):
        parts.update(P[:, a:b], Y[:, a:b])
    assert parts.count == n and np.array_equal(parts.confusion, whole.confusion)
    assert parts.accuracy == whole.accuracy and abs(parts.loss - whole.loss) < 1e-9
    predicted = np.argmax(P, 0) if k > 2 else (P[0] > 0.5).astype(int)
    assert whole.accuracy == np.mean(predicted == labels)
    expected_loss = -np.mean(np.log(np.clip(class_probabilities(P)[labels, np.arange(n)], 1e-12, 1)))
    assert abs(whole.loss - expected_loss) < 1e-9
    restored = Metrics(k)
    restored.load_state_dict(whole.state_dict())
    assert restored.summary() == whole.summary()


def test_precision_recall_and_undefined_cases():
    cm = np.array([[5, 0], [3, 0]])
    precision, recall = precision_recall(cm)
    assert precision.tolist() == [5 / 8, 0.0] and recall.tolist() == [1.0, 0.0]
    assert confusion_matrix(np.array([0, 1, 1]), np.array([1, 1, 0]), 2).tolist() == [[0, 1], [1, 1]]
    empty = Metrics(2).summary(["a", "b"])
    assert empty["n"] == 0 and np.isnan(empty["accuracy"])
