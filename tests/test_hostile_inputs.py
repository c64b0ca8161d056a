"""Checkpoints rebuilt by hand, models too big for memory, and wrong results that looked like
success: each a one-line error (or a usage error), never a traceback, MemoryError or bare NaN."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from streamnn.run.checkpoint import load_checkpoint, save_checkpoint
from streamnn.cli.eval import main as eval_main
from streamnn.cli.predict import main as predict_main
from streamnn.cli.train import main as train_main
from streamnn.paths import path_bytes
from streamnn.run.folder import LATEST
from tinystore import make_store

TRAIN = ["--epochs", "1", "--hidden", "4", "--batch-size", "4", "-q", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    store = make_store(folder / "s.h5")
    r = CliRunner().invoke(train_main, [str(store), "--out", str(folder / "run"), *TRAIN])
    assert r.exit_code == 0, r.output
    images = folder / "images"
    images.mkdir()
    for i, name in enumerate(["plain.png", "tab\there.png", "new\nline.png", "back\\slash.png"]):
        cv2.imwrite(str(images / name), np.full((8, 8, 3), 60 * i, np.uint8))
    os.rename(images / "plain.png", os.fsencode(images) + b"/caf\xe9.png")  # not UTF-8
    return store, folder / "run" / LATEST, images


def _error(result, *fragments):
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _edited(checkpoint: Path, out: Path, edit) -> Path:
    """The checkpoint with its content edited and saved again: the digest is valid, the content is not."""
    content = load_checkpoint(checkpoint)
    edit(content)
    save_checkpoint(out, content)
    return out


def _set_model_config(**changes):
    def edit(content):
        cfg = json.loads(content["model"]["config"])
        cfg.update(changes)
        content["model"]["config"] = json.dumps(cfg)
    return edit


def _set_data(**changes):
    return lambda content: content["data"].update(changes)


def _nan_weight(content):
    content["model"]["state"]["W0"][0, 0] = np.nan


HAND_BUILT = {
    "layer of 1e8 units": (_set_model_config(neuron_cnt=[48, 10 ** 8, 1]), "asks for 5,000,000,001 parameters"),
    "sizes not ints": (_set_model_config(neuron_cnt=[48, "4", 1]), "neuron_cnt must be a list of positive"),
    "negative size": (_set_model_config(neuron_cnt=[48, -4, 1]), "neuron_cnt must be a list of positive"),
    "unknown type": (_set_model_config(type="Transformer"), "unknown model type"),
    "config not json": (lambda c: c["model"].update(config="{"), "'model.config' is not a JSON dict"),
    "nan weight": (_nan_weight, "non-finite values"),
    "image_shape 2": (_set_data(image_shape=np.array([4, 12])), "'data.image_shape' must be three positive"),
    "image_shape product": (_set_data(image_shape=np.array([4, 2, 3])), "does not take images of shape (4, 2, 3)"),
    "class_names one": (_set_data(class_names=["cats"]), "'data.class_names' must be a list of at least two"),
    "class_names 3": (_set_data(class_names=["a", "b", "c"]), "outputs for 3 classes"),
    "mean shape": (_set_data(standardize=True, mean=np.zeros(3), std=np.ones(48)), "'data.mean' must be"),
    "std nan": (_set_data(standardize=True, mean=np.zeros(48), std=np.full(48, np.nan)), "'data.std' must be"),
    "channel order": (_set_data(channel_order="CMYK"), "'data.channel_order' must be"),
    "options": (_set_data(options="[1]"), "'data.options' must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(HAND_BUILT))
def test_hand_built_checkpoints_are_refused_before_allocating(run, tmp_path, case):
    store, checkpoint, images = run
    edit, message = HAND_BUILT[case]
    bad = _edited(checkpoint, tmp_path / "bad.h5", edit)
    started = time.monotonic()
    for command, args in ((eval_main, [str(bad), str(store)]), (predict_main, [str(bad), str(images), "--json"])):
        result = CliRunner().invoke(command, args)
        line = _error(result, str(bad))
        assert message in line, (case, line)
    assert time.monotonic() - started < 10  # nothing of 10^8 units was allocated


def test_resume_from_a_hand_built_checkpoint_is_one_line(run, tmp_path):
    store, checkpoint, _ = run
    out = tmp_path / "run"
    assert CliRunner().invoke(train_main, [str(store), "--out", str(out), *TRAIN]).exit_code == 0
    _edited(out / LATEST, out / LATEST, _set_model_config(neuron_cnt=[48, 10 ** 8, 1]))
    _error(CliRunner().invoke(train_main, ["--resume", "--out", str(out), "--epochs", "2", "-q"]), "architecture")


def test_a_dataset_declaring_more_than_the_file_holds_is_refused_unread(run, tmp_path):
    bad = tmp_path / "huge.h5"
    bad.write_bytes(run[1].read_bytes())
    with h5py.File(bad, "r+") as f:
        f["content/model/state"].create_dataset("W9", shape=(10 ** 6, 10 ** 6), dtype="f8", chunks=(1, 1000))
    _error(CliRunner().invoke(eval_main, [str(bad), str(run[0])]), "more than the file holds")


def test_a_model_too_big_for_memory_is_refused_before_allocating(run, tmp_path):
    started = time.monotonic()
    for hidden in ("100000000", "64,100000000"):
        r = CliRunner().invoke(train_main, [str(run[0]), "--out", str(tmp_path / "big"), "--hidden", hidden, "-q"])
        _error(r, "parameters", "GB", "memory available")
    assert time.monotonic() - started < 10 and not (tmp_path / "big" / LATEST).exists()


def test_empty_splits_are_errors_not_nan(tmp_path, run):
    empty_train = make_store(tmp_path / "et.h5", n_train=0)
    _error(CliRunner().invoke(train_main, [str(empty_train), "--out", str(tmp_path / "r"), *TRAIN]),
           "split 'train' is empty")
    empty_test = make_store(tmp_path / "ee.h5", n_test=0)
    _error(CliRunner().invoke(eval_main, [str(run[1]), str(empty_test)]), "split 'test' is empty")


@pytest.mark.parametrize("param,message", [
    ("bias_correction=maybe", "bias_correction must be true or false"),
    ("bias_correction=1", "bias_correction must be true or false"),
    ("beta1=true", "beta1 must be a finite number"),
    ("beta1=NaN", "beta1 must be a finite number"),
    ("beta1=high", "beta1 must be a finite number"),
    ("momentum=0.9", "has no parameter 'momentum'"),
])
def test_optimizer_parameters_are_checked_by_type(run, tmp_path, param, message):
    _error(CliRunner().invoke(train_main, [str(run[0]), "--out", str(tmp_path / "r"), "--opt-param", param, *TRAIN]),
           message)
    assert not (tmp_path / "r" / LATEST).exists()


@pytest.mark.parametrize("command,args", [
    (predict_main, ["--batch-size", "0"]), (eval_main, ["--batch-size", "0"]),
    (eval_main, ["--errors", "e.png", "--max-errors", "0"]), (eval_main, ["--max-errors", "-1"]),
])
def test_zero_sizes_are_usage_errors(run, command, args):
    target = [str(run[1]), str(run[2])] if command is predict_main else [str(run[1]), str(run[0])]
    r = CliRunner().invoke(command, [*target, *args])
    assert r.exit_code == 2 and "Invalid value" in r.output, r.output


@pytest.mark.parametrize("name,message", [("missing/e.png", "folder to save it in does not exist"),
                                          ("e.xyz", "cannot save a figure as .xyz"), ("fifo.png", "not a regular file")])
def test_eval_errors_path_is_checked_before_evaluating(run, tmp_path, name, message):
    if name == "fifo.png":
        os.mkfifo(tmp_path / name)
    # the store does not even exist: the --errors path is checked first
    r = CliRunner().invoke(eval_main, [str(run[1]), str(tmp_path / "nope.h5"), "--errors", str(tmp_path / name)])
    _error(r, message)


def test_predict_output_keeps_odd_names_on_one_line_and_json_strict(run):
    _, checkpoint, images = run
    r = CliRunner().invoke(predict_main, [str(checkpoint), str(images)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 4 and all(len(line.split("\t")) == 3 for line in lines)
    names = {os.path.basename(path_bytes(line.split("\t")[0])) for line in lines}
    assert names == {b"caf\xe9.png", b"tab\there.png", b"new\nline.png", b"back\\slash.png"}
    r = CliRunner().invoke(predict_main, [str(checkpoint), str(images), "--json"])

    def no_constants(name):
        raise AssertionError(f"bare {name} in JSON output")

    rows = [json.loads(line, parse_constant=no_constants) for line in r.output.splitlines()]
    assert len(rows) == 4 and {os.path.basename(path_bytes(row["path"])) for row in rows} == names


def test_odd_file_names_are_printed_in_their_one_line_text_form(run, tmp_path):
    from streamnn.cli.info import main as info_main

    store, checkpoint, _ = run
    odd = os.fsencode(tmp_path) + b"/ck \xe9\n.h5"
    Path(os.fsdecode(odd)).write_bytes(checkpoint.read_bytes())
    shown = str(tmp_path) + "/ck \\xe9\\x0a.h5"
    r = CliRunner().invoke(eval_main, [os.fsdecode(odd), str(store), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["checkpoint"] == shown, r.output
    bad = _edited(checkpoint, Path(os.fsdecode(odd)), _nan_weight)
    _error(CliRunner().invoke(predict_main, [str(bad), str(run[2])]), shown, "non-finite")
    odd_store = Path(os.fsdecode(os.fsencode(tmp_path) + b"/s\tore\xff.h5"))
    odd_store.write_bytes(store.read_bytes())
    r = CliRunner().invoke(info_main, [str(odd_store)])
    assert r.exit_code == 0 and f"{tmp_path}/s\\x09ore\\xff.h5" in r.output.splitlines()[0], r.output
    _error(CliRunner().invoke(eval_main, [str(checkpoint), str(odd_store), "--split", "nope"]),
           f"{tmp_path}/s\\x09ore\\xff.h5: unknown split 'nope'")
