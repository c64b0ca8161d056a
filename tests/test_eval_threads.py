"""--threads of streamnn-eval and streamnn-predict: the policy of streamnn.threads, and bad values."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from streamnn import threads
from streamnn.cli.eval import main as eval_main
from streamnn.cli.predict import main as predict_main
from streamnn.run.folder import LATEST
from streamnn.run.trainer import Trainer
from test_train import make_store


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """A store, a run trained one epoch on it, and one photo."""
    import cv2
    import numpy as np

    root = tmp_path_factory.mktemp("threads")
    store = make_store(root / "s.h5", n_train=16, n_test=8)
    with Trainer({"store": str(store), "epochs": 1, "hidden": [4], "batch_size": 8}, root / "run", verbose=False) as t:
        t.fit()
    cv2.imwrite(str(root / "cat.jpg"), np.random.default_rng(0).integers(0, 255, (20, 30, 3)).astype(np.uint8))
    return {"store": store, "out": root / "run", "files": {"test": [root / "cat.jpg"]}}


@pytest.fixture
def restore_threads():
    before = threads.blas_threads()
    if before is None:  # NumPy built without a BLAS threadpoolctl knows: nothing to set
        if os.environ.get("CI") == "true":
            pytest.fail("no BLAS library found by threadpoolctl: CI must run the thread tests")
        pytest.skip("no BLAS library found by threadpoolctl")
    yield
    threads.set_blas_threads(before)


def test_eval_sets_the_threads_it_is_given_and_auto_uses_every_usable_cpu(dataset, restore_threads, monkeypatch):
    args = [str(dataset["out"] / LATEST), str(dataset["store"]), "--json"]
    reports = []
    for option, usable, expected in ((["--threads", "2"], 1, 2), (["--threads", "1"], 2, 1), ([], 2, 2), ([], 1, 1)):
        monkeypatch.setattr(threads, "usable_cpus", lambda usable=usable: usable)
        r = CliRunner().invoke(eval_main, [*args, *option])
        assert r.exit_code == 0, r.output
        assert threads.blas_threads() == expected, (option, usable)  # evaluation keeps no CPU for a loader
        reports.append(json.loads(r.stdout)["accuracy"])
    assert len(set(reports)) == 1


def test_predict_sets_the_threads_it_is_given(dataset, restore_threads):
    photo = str(dataset["files"]["test"][0])
    for n in (2, 1):
        r = CliRunner().invoke(predict_main, [str(dataset["out"] / LATEST), photo, "--threads", str(n)])
        assert r.exit_code == 0 and r.stdout.count("\t") == 2, r.output
        assert threads.blas_threads() == n


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("value", ["zero", "0", "-1", "1.5"])
def test_a_bad_thread_count_is_one_error_line(dataset, command, value):
    main, second = (eval_main, str(dataset["store"])) if command == "eval" else \
        (predict_main, str(dataset["files"]["test"][0]))
    r = CliRunner().invoke(main, [str(dataset["out"] / LATEST), second, "--threads", value])
    assert r.exit_code == 1 and r.output.strip().splitlines() == \
        [f"Error: threads must be 'auto' or a positive number, not {value!r}"], r.output
