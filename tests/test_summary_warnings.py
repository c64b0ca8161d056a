"""A run that finished but learned nothing says so in its summary (a warning line, exit 0)."""
from __future__ import annotations

import math

from click.testing import CliRunner

from streamnn.cli.train import main as train_main
from streamnn.run.console import doubtful_result
from tinystore import make_store

CFG = {"train_split": "train", "eval_split": "test"}


def _history(**columns):
    base = {"train_loss": [0.7, 0.5], "train_accuracy": [0.6, 0.8], "val_accuracy": [math.nan, math.nan],
            "eval_accuracy": [0.5, 0.7]}
    return {**base, **columns}


def test_a_healthy_run_has_no_warning():
    assert doubtful_result(CFG, _history(), [0.7, 0.6, 0.5]) == []


def test_a_final_accuracy_of_zero_is_a_warning_naming_the_split():
    lines = doubtful_result(CFG, _history(eval_accuracy=[0.2, 0.0]), [0.7, 0.6])
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "'test' accuracy is 0.0" in lines[0]
    lines = doubtful_result(CFG, _history(train_accuracy=[0.0, 0.0], val_accuracy=[0.1, 0.0]), [0.7, 0.6])
    assert len(lines) == 2 and "training" in lines[0] and "validation" in lines[1]


def test_a_loss_that_never_moves_is_a_warning():
    assert "never moved" in doubtful_result(CFG, _history(train_loss=[0.69, 0.69]), [0.7, 0.6])[0]
    assert "over 3 steps" in doubtful_result(CFG, _history(train_loss=[0.69]), [0.69, 0.69, 0.69])[0]
    assert doubtful_result(CFG, _history(train_loss=[0.69]), [0.69]) == []  # one value: nothing to compare


def test_the_cli_summary_warns_about_a_run_that_learned_nothing(tmp_path):
    store = make_store(tmp_path / "s.h5")
    r = CliRunner().invoke(train_main, [str(store), "--out", str(tmp_path / "run"), "--lr", "1e-30", "--epochs", "2",
                                        "--hidden", "4", "--batch-size", "4", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "warning: the training loss never moved" in r.output, r.output
