"""Options of another model type, out-of-range sizes and an empty evaluation split: one-line errors
before anything is trained or allocated; a resolved configuration holds only the options that apply."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamnn.cli.train import main as train_main
from streamnn.data.store import open_store
from streamnn.run.config import DEFAULTS, resolve_config
from streamnn.run.modelkinds import MODEL_OPTIONS, MODEL_SPECIFIC, MODELS
from tinystore import make_store

QUICK = ["--epochs", "1", "--batch-size", "4", "-q", "--no-progress"]

#: Command-line spellings of each model option, with a value that is valid for the model it applies to.
OPTION_ARGS = {"hidden": ["--hidden", "4"], "conv": ["--conv", "2"], "kernel": ["--kernel", "3"],
               "batch_norm": ["--batch-norm"], "activation": ["--activation", "tanh"],
               "dropout": ["--dropout", "0.1"], "head": ["--head", "gap"]}
NO_FLAG = {"batch_norm": ["--no-batch-norm"], "head": ["--head", "flatten"]}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("opts") / "s.h5")


def _error(result, *fragments: str) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_the_table_covers_every_model_and_only_known_options():
    assert set(MODEL_OPTIONS) == set(MODELS)
    assert MODEL_SPECIFIC == set(OPTION_ARGS) and MODEL_SPECIFIC <= set(DEFAULTS)


@pytest.fixture(scope="module")
def store16(tmp_path_factory) -> Path:
    """16x16x3 images: the default cnn (three conv blocks) fits."""
    from streamnn import StoreWriter

    path = tmp_path_factory.mktemp("opts16") / "s16.h5"
    rng = np.random.default_rng(0)
    with StoreWriter(path, class_names=["cats", "dogs"], image_shape=(16, 16, 3), dtype="uint8") as w:
        for split, n in (("train", 8), ("test", 4)):
            w.add_split(split, n)
            w.write_rows(split, rng.integers(0, 255, (n, 16, 16, 3)).astype(np.uint8), np.arange(n) % 2,
                         [f"{split}/{i}.jpg" for i in range(n)])
        w.commit()
    return path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.sampled_from(sorted(MODELS)), picked=st.sets(st.sampled_from(sorted(OPTION_ARGS))),
       negated=st.booleans())
def test_random_option_combinations_per_model(store16, tmp_path_factory, model, picked, negated):
    args = ["--model", model]
    for key in sorted(picked):
        args += NO_FLAG.get(key, OPTION_ARGS[key]) if negated else OPTION_ARGS[key]
    foreign = sorted(picked - MODEL_OPTIONS[model])
    if foreign:  # refused before anything is written, naming every foreign option
        out = tmp_path_factory.mktemp("refused") / "run"
        line = _error(CliRunner().invoke(train_main, [str(store16), "--out", str(out), *args, *QUICK]),
                      f"--model {model}", *("--" + k.replace("_", "-") for k in foreign))
        assert not out.exists(), line
        return
    user = {"store": str(store16), "model": model}
    for key in picked:
        user[key] = {"hidden": [4], "conv": [2], "kernel": 3, "batch_norm": not negated, "activation": "tanh",
                     "dropout": 0.1, "head": "flatten" if negated else "gap"}[key]
    with open_store(store16) as s:
        cfg = resolve_config(user, s)
    assert not (set(cfg) & (MODEL_SPECIFIC - MODEL_OPTIONS[model]))  # nothing of another model recorded
    assert MODEL_OPTIONS[model] <= set(cfg)


@pytest.mark.parametrize("model, args, unused", [
    ("mlp", ["--hidden", "4"], {"conv", "kernel", "batch_norm", "head"}),
    ("logistic", [], {"hidden", "dropout", "activation", "conv", "kernel", "batch_norm", "head"}),
    ("cnn", ["--conv", "2", "--hidden", ""], {"activation", "head"}),  # the flatten head: saved as before it existed
    ("cnn", ["--conv", "2", "--head", "gap"], {"activation"}),
])
def test_a_new_run_records_only_the_options_of_its_model(store, tmp_path, model, args, unused):
    r = CliRunner().invoke(train_main, [str(store), "--out", str(tmp_path / "run"), "--model", model, *args, *QUICK])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert not (set(saved) & unused) and MODEL_OPTIONS[model] - unused <= set(saved)


def test_resuming_with_an_option_of_another_model_names_it(store, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(train_main, [str(store), "--out", str(out), "--hidden", "4", *QUICK])
    assert r.exit_code == 0, r.output
    _error(CliRunner().invoke(train_main, ["--resume", "--out", str(out), "--conv", "16", "--epochs", "2", "-q"]),
           "--conv does not apply to --model mlp")


@pytest.mark.parametrize("args, fragment", [
    (["--augment", "shift", "--shift", "100"], "shift must be from 1 to 3 pixels on 4x4 images"),
    (["--augment", "flip,shift", "--shift", "4"], "shift must be from 1 to 3"),
    (["--augment", "shift", "--shift", "0"], "shift must be from 1"),
    (["--model", "cnn", "--conv", "2", "--kernel", "9"], "kernel 9 is wider than the 4x4 images"),
    (["--batch-size", str(10 ** 11)], "batch-size must be from 1 to"),
    (["--epochs", str(10 ** 11)], "epochs must be from 1 to"),
    (["--batch-size", "0"], "batch-size must be from 1"),
    (["--seed", str(2 ** 70)], "seed must be a 64-bit integer"),
])
def test_out_of_range_options_are_refused(store, tmp_path, args, fragment):
    _error(CliRunner().invoke(train_main, [str(store), "--out", str(tmp_path / "run"), *args, "-q"]), fragment)


@pytest.mark.parametrize("augment", [[], ["--augment", "none"], ["--augment", "flip"], ["--augment", "erase=0.5"]])
@pytest.mark.parametrize("args, named", [
    (["--shift", "100"], "--shift applies"),  # not even checked against the image size: it would change nothing
    (["--shift", "2"], "--shift applies"),
    (["--shift-padding", "zero"], "--shift-padding applies"),
    (["--shift", "2", "--shift-padding", "zero"], "--shift and --shift-padding apply"),
])
def test_shift_options_without_the_shift_augmentation_are_refused(store, tmp_path, augment, args, named):
    out = tmp_path / "run"
    line = _error(CliRunner().invoke(train_main, [str(store), "--out", str(out), *augment, *args, *QUICK]),
                  named, "add shift to --augment")
    assert not out.exists(), line


def test_shift_options_with_the_shift_augmentation_are_recorded(store, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(train_main, [str(store), "--out", str(out), "--augment", "flip,shift", "--shift", "2",
                                        "--shift-padding", "zero", *QUICK])
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "config.json").read_text())
    assert (saved["augment"], saved["shift"], saved["shift_padding"]) == ("flip,shift", 2, "zero")
    _error(CliRunner().invoke(train_main, ["--resume", "--out", str(out), "--augment", "flip", "--shift", "2",
                                           "--epochs", "2", "-q"]), "--shift applies", "--augment flip")


def test_resuming_a_run_without_shifts_with_a_shift_option_names_it(store, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(train_main, [str(store), "--out", str(out), "--augment", "flip", *QUICK])
    assert r.exit_code == 0, r.output
    _error(CliRunner().invoke(train_main, ["--resume", "--out", str(out), "--shift", "2", "--epochs", "2", "-q"]),
           "--shift applies", "--augment flip")


def test_a_batch_beyond_memory_is_refused_with_the_split_size(tmp_path):
    rows = make_store(tmp_path / "s.h5")
    line = _error(CliRunner().invoke(train_main, [str(rows), "--out", str(tmp_path / "run"), "--batch-size",
                                                  str(2 ** 31), "-q"]), "batch-size 2,147,483,648", "GB",
                  "'train' split has 12 rows")
    assert not (tmp_path / "run" / "checkpoint-latest.h5").exists(), line


def test_a_batch_size_beyond_the_rows_but_in_memory_trains(tmp_path):
    rows = make_store(tmp_path / "s.h5")
    r = CliRunner().invoke(train_main, [str(rows), "--out", str(tmp_path / "run"), "--batch-size", "1000",
                                        "--epochs", "1", "-q"])
    assert r.exit_code == 0, r.output


def test_the_budget_counts_the_copies_a_checkpoint_takes(store, tmp_path, monkeypatch):
    """Room for the arrays of the training steps but not for a checkpoint's copies next to them (saved,
    or loaded on --resume) is refused up front; room for both trains and resumes."""
    from streamnn.run import budget

    with open_store(store) as s:
        params = budget.dense_parameter_count([s.n_features, 1000, 1])
    args = [str(store), "--hidden", "1000", *QUICK]
    monkeypatch.setattr(budget, "available_memory", lambda: params * 4 * (budget.TRAINING_COPIES + 3))
    _error(CliRunner().invoke(train_main, [*args, "--out", str(tmp_path / "refused")]), "50,001 parameters")
    assert not (tmp_path / "refused" / "checkpoint-latest.h5").exists()
    monkeypatch.setattr(budget, "available_memory",
                        lambda: params * 4 * (budget.TRAINING_COPIES + budget.CHECKPOINT_COPIES + 1))
    r = CliRunner().invoke(train_main, [*args, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(train_main, ["--resume", "--out", str(tmp_path / "run"), "--epochs", "2", "-q"])
    assert r.exit_code == 0, r.output


def test_an_allocation_that_fails_all_the_same_is_one_line(store, tmp_path, monkeypatch):
    """A MemoryError the budget did not foresee (here at the first checkpoint) is an ``Error: out of
    memory`` line, with no temporary file left; reading a checkpoint that does not fit is not called corrupt."""
    from streamnn.run import checkpoint, trainer

    def short(**kwargs):
        raise MemoryError("Unable to allocate 128. MiB for an array with shape (4096, 8192) and data type float32")

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(trainer, "run_content", short)
        line = _error(CliRunner().invoke(train_main, [str(store), "--out", str(out), "--hidden", "4", *QUICK]),
                      "Error: out of memory: Unable to allocate 128. MiB", "ulimit -v")
    assert not [p for p in out.iterdir() if p.name.endswith(".h5") or p.name.startswith(".streamnn-tmp")], line
    r = CliRunner().invoke(train_main, [str(store), "--out", str(out), "--hidden", "4", "--force", *QUICK])
    assert r.exit_code == 0, r.output

    def no_room(group, max_bytes):
        raise MemoryError()

    monkeypatch.setattr(checkpoint, "_read_group", no_room)
    _error(CliRunner().invoke(train_main, ["--resume", "--out", str(out), "--epochs", "2", "-q"]),
           "checkpoint-latest.h5: checkpoint does not fit in the memory available")


_RLIMIT_CHILD = """
import resource, sys
from streamnn.cli.train import main
with open("/proc/self/statm") as f:
    used = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + 300 * 2 ** 20, resource.RLIM_INFINITY))
main(sys.argv[1:])
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_the_memory_budget_respects_the_address_space_limit(tmp_path):
    store = make_store(tmp_path / "s.h5")
    # 5000 x 5000 hidden units: 25M parameters, about 600 MB with the buffers: more than ulimit -v leaves
    proc = subprocess.run([sys.executable, "-c", _RLIMIT_CHILD, str(store), "--out", str(tmp_path / "run"),
                           "--hidden", "5000,5000", "-q"], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "parameters" in lines[0] and "ulimit -v" in lines[0], lines[0]


def test_an_empty_evaluation_split_is_an_error_up_front(tmp_path):
    store = make_store(tmp_path / "s.h5", n_test=0)
    for split in ("auto", "test"):
        line = _error(CliRunner().invoke(train_main, [str(store), "--out", str(tmp_path / split), "--eval-split",
                                                      split, *QUICK]), "'test' split is empty", "--eval-split none")
        assert not (tmp_path / split / "checkpoint-latest.h5").exists(), line
    r = CliRunner().invoke(train_main, [str(store), "--out", str(tmp_path / "none"), "--eval-split", "none", *QUICK])
    assert r.exit_code == 0, r.output


def test_a_moved_store_on_resume_says_a_new_path_can_be_given(tmp_path):
    store = make_store(tmp_path / "s.h5")
    out = tmp_path / "run"
    assert CliRunner().invoke(train_main, [str(store), "--out", str(out), "--hidden", "4", *QUICK]).exit_code == 0
    store.rename(tmp_path / "moved.h5")
    _error(CliRunner().invoke(train_main, ["--resume", "--out", str(out), "--epochs", "2", "-q"]),
           "not there", "streamnn-train NEWPATH --resume --out")
    r = CliRunner().invoke(train_main, [str(tmp_path / "moved.h5"), "--resume", "--out", str(out), "--epochs", "2",
                                        "-q"])
    assert r.exit_code == 0, r.output
    assert np.isfinite(json.loads((out / "config.json").read_text())["lr"])
