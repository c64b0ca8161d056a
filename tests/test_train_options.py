"""Training options: --early-stop (stops, resumes exactly, may change on resume, agrees over ranks)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from streamnn.cli.train import main as train_main
from streamnn.errors import StreamnnError
from streamnn.run.stop import TrainingInterrupted
from streamnn.run.trainer import Trainer
from test_train import assert_same_run, make_store

# lr so small that the selection accuracy never improves after epoch 1
STALL = dict(model="mlp", hidden=[4], batch_size=16, eval_batch_size=16, epochs=10, lr=1e-12, val_fraction=0.25,
             eval_split=None, seed=2, checkpoint_every=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "s.h5")


def test_early_stop_stops_after_n_epochs_without_improvement(store, tmp_path):
    said: list[str] = []
    with Trainer({"store": str(store), **STALL, "early_stop": 2}, tmp_path / "run", echo=said.append) as t:
        history = t.fit()
        assert t.best_epoch == 1 and t.epoch == 3 and history["epoch"] == [1, 2, 3]
    assert any("early stop: no better val accuracy in the 2 epochs since epoch 1" in line for line in said)
    with Trainer.resume(tmp_path / "run", verbose=False) as t:  # resumed as it is: still stopped
        t.fit()
        assert t.epoch == 3
    with Trainer.resume(tmp_path / "run", verbose=False, changes={"early_stop": 4}) as t:
        t.fit()
        assert t.epoch == 5


def test_early_stopped_run_interrupted_and_resumed_is_bit_identical(store, tmp_path):
    cfg = {"store": str(store), **STALL, "early_stop": 2}
    with Trainer(cfg, tmp_path / "straight", verbose=False) as t:
        t.fit()

    def stop_at(t):
        if t.step == 7:
            t.request_stop()

    with Trainer(cfg, tmp_path / "stopped", verbose=False) as t, pytest.raises(TrainingInterrupted):
        t.fit(on_step=stop_at)
    with Trainer.resume(tmp_path / "stopped", verbose=False) as t:
        t.fit()
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")


def test_early_stop_option_and_its_errors(store, tmp_path):
    with pytest.raises(StreamnnError, match="early-stop must be >= 0"):
        Trainer({"store": str(store), **STALL, "early_stop": -1}, tmp_path / "bad", verbose=False)
    out = str(tmp_path / "cli")
    args = [str(store), "--hidden", "4", "--lr", "1e-12", "--val-fraction", "0.25", "--eval-split", "none",
            "--epochs", "6", "--out", out]
    r = CliRunner().invoke(train_main, [*args, "--early-stop", "1"])
    assert r.exit_code == 0 and "early stop" in r.output and "epoch 2/6" in r.output, r.output
    assert "epoch 3/6" not in r.output
    r = CliRunner().invoke(train_main, ["--out", out, "--resume", "--early-stop", "0"])  # may change on resume
    assert r.exit_code == 0 and "epoch 6/6" in r.output, r.output
