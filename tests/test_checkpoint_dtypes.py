"""Checkpoint members of every dtype HDF5 can return, and crafted but digest-valid checkpoints:
eval, predict and --resume either work or end in one ``Error:`` line, never a traceback or a
wrong result that exits 0."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamnn.cli.eval import main as eval_main
from streamnn.cli.predict import main as predict_main
from streamnn.cli.train import main as train_main
from streamnn.run.checkpoint import _escape, digest, load_checkpoint, save_checkpoint
from streamnn.run.folder import LATEST
from tinystore import make_store

TRAIN = ["--epochs", "1", "--hidden", "4", "--batch-size", "4", "-q", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dtypes")
    store = make_store(folder / "s.h5")
    r = CliRunner().invoke(train_main, [str(store), "--out", str(folder / "run"), *TRAIN])
    assert r.exit_code == 0, r.output
    image = folder / "a.png"
    cv2.imwrite(str(image), np.full((8, 8, 3), 90, np.uint8))
    return store, folder / "run", image, folder


def _one_line_or_success(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        (result.output, repr(result.exception))
    if result.exit_code != 0:
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output


def _leaves(content: dict, prefix: tuple = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in content.items():
        out += _leaves(value, prefix + (key,)) if isinstance(value, dict) else [prefix + (key,)]
    return out


def _groups(content: dict, prefix: tuple = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for key, value in content.items():
        if isinstance(value, dict):
            out += _groups(value, prefix + (key,))
    return out


#: One value of every kind of dtype h5py can return: (dtype, values for a shape).
def _values(kind: str, shape: tuple[int, ...]):
    n = int(np.prod(shape))
    if kind == "opaque":
        return None, np.zeros(shape, "V36")
    if kind == "compound":
        return None, np.zeros(shape, [("a", "<i4"), ("b", "<f8")])
    if kind == "subarray":
        return np.dtype("(2,)f4"), np.zeros(shape, np.dtype("(2,)f4"))  # NumPy folds (2,) into the shape
    if kind == "enum":
        return h5py.enum_dtype({"A": 0, "B": 1}, basetype="i1"), np.ones(shape, "i1")
    if kind == "vlen":
        data = np.empty(shape, object)
        for i in np.ndindex(shape):
            data[i] = np.arange(2, dtype=np.int32)
        return h5py.vlen_dtype(np.int32), data
    if kind == "reference":
        return h5py.ref_dtype, None
    if kind in ("utf-8", "ascii"):
        return h5py.string_dtype(kind), np.array(["x\u00e9" if kind == "utf-8" else "x"] * n, object).reshape(shape)
    if kind == "fixed-utf-8":
        return h5py.string_dtype("utf-8", 6), None  # fixed length, filled with empty strings
    if kind == "bytes":
        return None, np.array([b"\xff\xfe"] * n, "S2").reshape(shape)
    return None, (np.arange(n) % 3).astype(kind).reshape(shape)


KINDS = ["opaque", "compound", "subarray", "enum", "vlen", "reference", "utf-8", "ascii", "fixed-utf-8", "bytes",
         "bool", "complex64", "complex128", ">f8", ">i4", "<f2", "u8", "i1", "f4", "f8", ">c16"]


def _plant(src: Path, dst: Path, where: tuple[str, ...], kind: str, shape: tuple[int, ...], as_attr: bool) -> None:
    """``src`` with the member ``where`` (replaced, or added) set to values of ``kind``; the digest is
    made valid whenever the format can compute one for the new content."""
    shutil.copyfile(src, dst)
    dtype, data = _values(kind, shape)
    content = load_checkpoint(src)
    with h5py.File(dst, "r+") as f:
        group = f["content"]
        for part in where[:-1]:
            group = group[_escape(part)]
        name = _escape(where[-1])
        if name in group:
            del group[name]
        if name in group.attrs:
            del group.attrs[name]
        if as_attr and data is not None:
            group.attrs.create(name, data, dtype=dtype)
        elif dtype is not None and dtype.subdtype is not None:  # h5py writes a subarray dataset's zeros only
            group.create_dataset(name, shape=shape, dtype=dtype)
        else:
            group.create_dataset(name, shape=shape, dtype=dtype or data.dtype, data=data)
        node = content
        for part in where[:-1]:
            node = node[part]
        node[where[-1]] = data if data is not None and data.dtype.kind in "biufc" and data.dtype.names is None \
            else None
        try:
            f.attrs["sha256"] = digest(content)
        except (TypeError, ValueError):
            pass


def _commands(run, ckpt: Path, folder: Path) -> None:
    store, _, image, _ = run
    _one_line_or_success(CliRunner().invoke(eval_main, [str(ckpt), str(store)]))
    _one_line_or_success(CliRunner().invoke(predict_main, [str(ckpt), str(image)]))
    _one_line_or_success(CliRunner().invoke(train_main, ["--resume", "--out", str(folder), "--epochs", "2", "-q",
                                                         "--no-progress"]))


_counter = itertools.count()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), kind=st.sampled_from(KINDS), shape=st.sampled_from([(), (3,), (2, 2), (0,)]),
       as_attr=st.booleans(), extra=st.booleans())
def test_any_dtype_in_an_extra_or_replaced_member_works_or_is_one_line(run, data, kind, shape, as_attr, extra):
    _, folder, _, base = run
    content = load_checkpoint(folder / LATEST)
    if extra:
        where = data.draw(st.sampled_from(_groups(content))) + ("extra member",)
    else:
        where = data.draw(st.sampled_from(_leaves(content)))
    target = base / f"copy{next(_counter)}"
    shutil.copytree(folder, target)
    _plant(folder / LATEST, target / LATEST, where, kind, shape, as_attr)
    _commands(run, target / LATEST, target)


@pytest.mark.parametrize("kind", ["opaque", "compound", "vlen", "reference", "enum", "bytes"])
def test_an_opaque_or_foreign_member_names_the_member(run, tmp_path, kind):
    _, folder, _, _ = run
    target = tmp_path / "run"
    shutil.copytree(folder, target)
    _plant(folder / LATEST, target / LATEST, ("model", "state", "junk"), kind, (3,), False)
    if kind == "enum":  # enum values are integers: read as such (and then unused)
        load_checkpoint(target / LATEST)
        return
    r = CliRunner().invoke(eval_main, [str(target / LATEST), str(run[0])])
    _one_line_or_success(r)
    assert r.exit_code == 1 and "/content/model/state/junk" in r.output, r.output


def test_big_endian_members_load_in_native_order_with_the_same_digest(tmp_path):
    content = {"a": np.arange(6, dtype=">f8").reshape(2, 3), "b": {"c": np.array(7, ">i4")}}
    save_checkpoint(tmp_path / "c.h5", content)
    loaded = load_checkpoint(tmp_path / "c.h5")
    assert loaded["a"].dtype == np.dtype("f8") and loaded["a"].dtype.isnative
    assert np.array_equal(loaded["a"], content["a"]) and int(loaded["b"]["c"]) == 7


# -- crafted but digest-valid content --------------------------------------------------------------
def _edited(run, tmp_path: Path, edit) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run[1], target)
    content = load_checkpoint(target / LATEST)
    edit(content)
    save_checkpoint(target / LATEST, content)
    return target


def _error_line(result, *fragments: str) -> str:
    _one_line_or_success(result)
    assert result.exit_code == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    return result.output


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c["progress"].update(best=float("inf")), "progress.best"),
    (lambda c: c["progress"].update(best=1.5), "progress.best"),
    (lambda c: c["progress"].update(best=float("nan")), "progress.best"),
    (lambda c: c["progress"].update(best=-float("inf")), "progress.best"),   # best_epoch is 1 here
    (lambda c: c["progress"].update(best_epoch=5), "progress"),
    (lambda c: c["progress"].update(step=-1), "progress.step"),
    (lambda c: c["progress"].update(epoch_step=10 ** 6), "progress"),
    (lambda c: c["history"].update(train_accuracy=np.array([7.0])), "history.train_accuracy"),
    (lambda c: c["history"].update(train_loss=np.array([-1.0])), "history.train_loss"),
    (lambda c: c["history"].update(lr=np.array([np.inf])), "history.lr"),
    (lambda c: c["history"].update(epoch=np.array([3.0])), "history.epoch"),
    (lambda c: c["history"].update(eval_accuracy=np.array([1.0, 1.0])), "history.eval_accuracy"),
    (lambda c: c["history"].update(best=["1"]), "history.best"),
])
def test_progress_and_history_out_of_range_are_refused_on_resume(run, tmp_path, edit, fragment):
    target = _edited(run, tmp_path, edit)
    r = CliRunner().invoke(train_main, ["--resume", "--out", str(target), "--epochs", "2", "-q", "--no-progress"])
    _error_line(r, fragment)


def test_a_cnn_checkpoint_whose_model_image_shape_differs_from_the_store_is_refused(tmp_path):
    store = make_store(tmp_path / "s.h5")  # 4x4x3 images
    out = tmp_path / "cnn"
    r = CliRunner().invoke(train_main, [str(store), "--out", str(out), "--model", "cnn", "--conv", "2",
                                        "--hidden", "", "--epochs", "1", "--batch-size", "4", "-q", "--no-progress"])
    assert r.exit_code == 0, r.output
    content = load_checkpoint(out / LATEST)
    cfg = json.loads(content["model"]["config"])
    cfg["image_shape"] = [2, 8, 3]  # the same pixel count as 4x4x3, and the same parameter count
    content["model"]["config"] = json.dumps(cfg)
    save_checkpoint(out / LATEST, content)
    _error_line(CliRunner().invoke(eval_main, [str(out / LATEST), str(store)]), "2x8x3", "4x4x3")


@pytest.mark.parametrize("changes", [{"hidden": 5}, {"model": [1]}, {"optimizer_params": "x"}, {"conv": "abc"},
                                     {"epochs": "ten"}, {"schedule_params": [1]}, {"store": 7}, {"seed": 1.5}])
def test_a_crafted_run_configuration_is_one_line_on_resume(run, tmp_path, changes):
    def edit(content):
        cfg = json.loads(content["config"])
        cfg.update(changes)
        content["config"] = json.dumps(cfg)

    target = _edited(run, tmp_path, edit)
    _one_line_or_success(CliRunner().invoke(train_main, ["--resume", "--out", str(target), "--epochs", "2", "-q"]))
