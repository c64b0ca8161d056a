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


def stop_and_resume(cfg: dict, out, step: int, on_resume=None) -> None:
    """Train ``cfg`` into ``out``, stopped at ``step`` and resumed to its end (``on_resume(trainer)``
    checks the resumed trainer before it goes on)."""
    def stop_at(t):
        if t.step == step:
            t.request_stop()

    with Trainer(cfg, out, verbose=False) as t, pytest.raises(TrainingInterrupted):
        t.fit(on_step=stop_at)
    with Trainer.resume(out, verbose=False) as t:
        if on_resume is not None:
            on_resume(t)
        t.fit()


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

    stop_and_resume(cfg, tmp_path / "stopped", 7)
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


# -- --ema -------------------------------------------------------------------------------------------
def test_weight_average_follows_its_formula_and_restores_the_trained_weights():
    import numpy as np
    from streamnn.nn.ema import WeightAverage, averaged
    from streamnn.nn.models import DeepNetwork
    from streamnn.optim import Adam

    model = DeepNetwork([5, 4, 1], ["relu", "sigmoid"], seed=1)
    opt = WeightAverage(Adam(model, 0.1), 0.9)
    expected = model.flat_params.copy()
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(5, 8)).astype(np.float32), (rng.random((1, 8)) < 0.5).astype(np.float32)
    for _ in range(4):
        opt.zero_grad()
        model.forward(X)
        model.backward(Y)
        opt.step()
        expected = np.float32(0.9) * expected + np.float32(0.1) * model.flat_params
    trained = model.flat_params.copy()
    with averaged(opt):
        np.testing.assert_allclose(model.flat_params, expected, rtol=1e-6)
    assert np.array_equal(model.flat_params, trained)
    state = opt.state_dict()
    again = WeightAverage(Adam(DeepNetwork([5, 4, 1], ["relu", "sigmoid"], seed=1), 0.1), 0.9)
    again.load_state_dict(state)
    assert np.array_equal(again.average, opt.average) and again.t == opt.t == 4
    with pytest.raises(StreamnnError, match="no 'ema'"):
        again.load_state_dict({k: v for k, v in state.items() if k != "ema"})
    with pytest.raises(StreamnnError, match="decay must be in"):
        WeightAverage(Adam(model, 0.1), 1.0)


def test_ema_run_evaluates_the_average_keeps_it_in_best_and_resumes_exactly(store, tmp_path):
    import numpy as np
    from streamnn.run.checkpoint import load_checkpoint
    from streamnn.run.folder import BEST, LATEST
    cfg = {"store": str(store), "model": "mlp", "hidden": [4], "batch_size": 16, "epochs": 3, "lr": 0.05,
           "val_fraction": 0.25, "seed": 1, "checkpoint_every": 1, "ema": 0.8}
    with Trainer(cfg, tmp_path / "straight", verbose=False) as t:
        t.fit()
        latest = load_checkpoint(tmp_path / "straight" / LATEST)
        average = latest["optimizer"]["state"]["ema"]
        assert np.array_equal(average, t.optimizer.average)
        assert not np.array_equal(average, t.model.flat_params)  # the trained weights differ from their average
        assert t.evaluate_split("val").accuracy == t.history["val_accuracy"][-1]
    with Trainer({**cfg, "epochs": 1}, tmp_path / "one", verbose=False) as t:  # epoch 1 is always the best
        t.fit()
        best = load_checkpoint(tmp_path / "one" / BEST)["model"]["state"]
        flat = np.concatenate([np.ravel(best[k]) for k in t.model.params])
        assert np.array_equal(flat, t.optimizer.average)  # checkpoint-best holds the average as the weights
        assert not np.array_equal(flat, t.model.flat_params)

    stop_and_resume(cfg, tmp_path / "stopped", 5)
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")
    with pytest.raises(StreamnnError, match="ema"):
        Trainer({**cfg, "ema": 1.5}, tmp_path / "bad", verbose=False)


def test_label_smoothing_trains_resumes_exactly_and_is_saved_only_when_set(store, tmp_path):
    cfg = {"store": str(store), "model": "mlp", "hidden": [4], "batch_size": 16, "epochs": 2, "lr": 0.05,
           "seed": 1, "checkpoint_every": 1, "label_smoothing": 0.1}
    with Trainer(cfg, tmp_path / "straight", verbose=False) as t:
        assert t.model.label_smoothing == 0.1 and t.config["label_smoothing"] == 0.1
        t.fit()

    def smoothing_kept(t):
        assert t.model.label_smoothing == 0.1

    stop_and_resume(cfg, tmp_path / "stopped", 3, on_resume=smoothing_kept)
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")
    with Trainer({**cfg, "label_smoothing": 0.0}, tmp_path / "plain", verbose=False) as t:
        assert "label_smoothing" not in t.config and t.model.label_smoothing == 0.0
    with pytest.raises(StreamnnError, match="label-smoothing must be in"):
        Trainer({**cfg, "label_smoothing": 1.0}, tmp_path / "bad", verbose=False)


# -- --head ------------------------------------------------------------------------------------------
def test_a_gap_headed_cnn_trains_resumes_exactly_and_is_saved_only_when_chosen(store, tmp_path):
    import json

    from streamnn.run.checkpoint import load_checkpoint
    from streamnn.run.folder import LATEST
    from streamnn.run.state import load_run_config

    cfg = {"store": str(store), "model": "cnn", "conv": [3, 4], "hidden": [5], "batch_norm": True, "head": "gap",
           "batch_size": 16, "epochs": 2, "lr": 0.01, "augment": "flip,shift", "shift": 1, "seed": 1,
           "checkpoint_every": 1}
    with Trainer(cfg, tmp_path / "straight", verbose=False) as t:
        assert t.model.params["dense0.W"].shape == (5, 4)
        t.fit()
    assert load_run_config(tmp_path / "straight" / LATEST)["head"] == "gap"
    assert json.loads(load_checkpoint(tmp_path / "straight" / LATEST)["model"]["config"])["head"] == "gap"

    def head_kept(t):
        assert t.model.config()["head"] == "gap"

    stop_and_resume(cfg, tmp_path / "stopped", 3, on_resume=head_kept)
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")
    with Trainer({**cfg, "head": "flatten"}, tmp_path / "flat", verbose=False) as t:  # as runs before the option
        assert "head" not in t.config and "head" not in t.model.config()
    with pytest.raises(StreamnnError, match="head must be one of flatten, gap, not 'max'"):
        Trainer({**cfg, "head": "max"}, tmp_path / "bad", verbose=False)
    r = CliRunner().invoke(train_main, [str(store), "--out", str(tmp_path / "mlp"), "--head", "gap"])
    assert r.exit_code == 1 and "--head does not apply to --model mlp" in r.output, r.output
