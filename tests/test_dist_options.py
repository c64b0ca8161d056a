"""--ema, --early-stop, --label-smoothing and --head under mpiexec: 2 ranks train the one-process run."""
from __future__ import annotations

import numpy as np

from streamnn.run.checkpoint import load_checkpoint
from streamnn.run.folder import LATEST
from test_dist_train import CONFIG, job, one_process, store  # noqa: F401  (store: the module's fixture)


def test_two_ranks_with_ema_early_stop_and_label_smoothing_equal_one_process(store, tmp_path):  # noqa: F811
    cfg = {**CONFIG, "store": str(store), "dtype": "float64", "epochs": 6, "ema": 0.7, "early_stop": 1,
           "label_smoothing": 0.1}
    single = one_process(cfg, tmp_path / "one")
    two, _ = job(tmp_path, "two", cfg, tmp_path / "two")
    np.testing.assert_allclose(two, single, rtol=1e-10, atol=1e-13)
    a, b = load_checkpoint(tmp_path / "one" / LATEST), load_checkpoint(tmp_path / "two" / LATEST)
    np.testing.assert_allclose(b["optimizer"]["state"]["ema"], a["optimizer"]["state"]["ema"], rtol=1e-10, atol=1e-13)
    assert a["progress"]["epoch"] == b["progress"]["epoch"]  # the same early stop
    assert (tmp_path / "one" / "metrics.csv").read_text().splitlines()[0] == \
        (tmp_path / "two" / "metrics.csv").read_text().splitlines()[0]


def test_two_ranks_train_a_gap_headed_cnn_as_one_process(store, tmp_path):  # noqa: F811
    """(Without batch norm: its statistics are per process, so mpiexec refuses it.)"""
    cfg = {**CONFIG, "store": str(store), "dtype": "float64", "epochs": 2, "model": "cnn", "conv": [3, 4],
           "head": "gap"}
    single = one_process(cfg, tmp_path / "one")
    two, _ = job(tmp_path, "two", cfg, tmp_path / "two")
    np.testing.assert_allclose(two, single, rtol=1e-10, atol=1e-13)
    a, b = load_checkpoint(tmp_path / "one" / LATEST), load_checkpoint(tmp_path / "two" / LATEST)
    assert a["model"]["config"] == b["model"]["config"] and '"head": "gap"' in a["model"]["config"]
