"""Stores edited or damaged by another tool: info, train and eval each give one `Error:` line and
exit 1, never a traceback. A generator of tampered variants (wrong attribute types and shapes,
swapped groups and datasets, missing members, out-of-range and non-finite values) and random
byte flips of a small store file."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from streamnn.cli.eval import main as eval_main
from streamnn.cli.info import main as info_main
from streamnn.cli.train import main as train_main
from streamnn.run.folder import LATEST
from tinystore import D, make_store

def _attr(name, value):
    def tamper(f):
        f.attrs[name] = value
    return tamper


def _del_attr(name):
    return lambda f: f.attrs.__delitem__(name)


def _replace(member, **kw):
    def tamper(f):
        del f[member]
        f.create_dataset(member, **kw)
    return tamper


def _swap_to_dataset(member):
    def tamper(f):
        del f[member]
        f.create_dataset(member, data=np.zeros(3))
    return tamper


def _swap_to_group(member):
    def tamper(f):
        del f[member]
        f.create_group(member)
    return tamper


def _set(member, index, value):
    def tamper(f):
        f[member][index] = value
    return tamper


STR = h5py.string_dtype()
VARIANTS = {
    # root attributes: wrong type, shape, value, missing
    "format_version str": _attr("format_version", "1"),
    "format_version float": _attr("format_version", 1.5),
    "format_version array": _attr("format_version", np.array([1, 1])),
    "class_names int": _attr("class_names", 3),
    "class_names numbers": _attr("class_names", np.array([1, 2])),
    "class_names duplicate": _attr("class_names", np.array(["a", "a"], dtype=object).astype(STR)),
    "class_names 2d": _attr("class_names", np.array([["a", "b"]], dtype=STR)),
    "class_names empty name": _attr("class_names", np.array(["", "b"], dtype=STR)),
    "image_shape 2": _attr("image_shape", np.array([4, 12])),
    "image_shape negative": _attr("image_shape", np.array([-4, -4, 3])),
    "image_shape zero": _attr("image_shape", np.array([0, 4, 3])),
    "image_shape float": _attr("image_shape", np.array([4.0, 4.0, 3.0])),
    "image_shape product": _attr("image_shape", np.array([4, 2, 6])),
    "image_shape str": _attr("image_shape", "4x4x3"),
    "image_shape huge": _attr("image_shape", np.array([1 << 20, 1 << 20, 3])),
    "channel_order": _attr("channel_order", "XYZ"),
    "channel_order int": _attr("channel_order", 3),
    "channel gray vs 3": _attr("channel_order", "GRAY"),
    "dtype unknown": _attr("dtype", "int64"),
    "dtype inconsistent": _attr("dtype", "float32"),
    "dtype array": _attr("dtype", np.array([1, 2])),
    "scale nan": _attr("scale", np.nan),
    "scale inf": _attr("scale", np.inf),
    "scale zero": _attr("scale", 0.0),
    "scale negative": _attr("scale", -1 / 255),
    "scale str": _attr("scale", "1/255"),
    "scale array": _attr("scale", np.array([1.0, 2.0])),
    "scale wrong": _attr("scale", 1.0),
    "fingerprint int": _attr("fingerprint", 5),
    "options not json": _attr("options", "{nope"),
    "options list": _attr("options", "[1, 2]"),
    "counts wrong": _attr("counts", json.dumps({"train": {"cats": 1, "dogs": 11}, "test": {"cats": 3, "dogs": 3}})),
    "counts not json": _attr("counts", "nope"),
    "counts number": _attr("counts", 5),
    "pixel_layout": _attr("pixel_layout", "CHW"),
    "command int": _attr("command", 7),
    "command not utf-8": _attr("command", np.bytes_(b"caf\xe9")),
    "class_names not utf-8": _attr("class_names", np.array([b"caf\xe9", b"dogs"])),
    "fingerprint not hex": _attr("fingerprint", "z" * 64),
    **{f"missing {a}": _del_attr(a) for a in ("format_version", "class_names", "image_shape", "channel_order",
                                              "dtype", "scale", "fingerprint", "counts")},
    # members: swapped, missing, wrong shape/type/range
    "split is dataset": _swap_to_dataset("test"),
    "X is group": _swap_to_group("train/X"),
    "y is group": _swap_to_group("train/y"),
    "paths is group": _swap_to_group("train/paths"),
    "stats is dataset": _swap_to_dataset("stats"),
    "stats/mean is group": _swap_to_group("stats/mean"),
    "skipped is dataset": _swap_to_dataset("skipped"),
    "missing X": lambda f: f.__delitem__("train/X"),
    "missing y": lambda f: f.__delitem__("train/y"),
    "missing paths": lambda f: f.__delitem__("test/paths"),
    "missing std": lambda f: f.__delitem__("stats/std"),
    "missing skipped reasons": lambda f: f.__delitem__("skipped/reasons"),
    "no split": lambda f: (f.__delitem__("train"), f.__delitem__("test")),
    "X 1d": _replace("train/X", data=np.zeros(12 * D, np.uint8)),
    "X wrong D": _replace("train/X", data=np.zeros((12, D + 1), np.uint8)),
    "X wrong dtype": _replace("train/X", data=np.zeros((12, D), np.float64)),
    "y float": _replace("train/y", data=(np.arange(12) % 2).astype(np.float32)),
    "y 2d": _replace("train/y", data=np.zeros((12, 1), np.int32)),
    "y short": _replace("train/y", data=np.zeros(5, np.int32)),
    "y out of range": _set("train/y", 0, 7),
    "y negative": _set("train/y", 3, -1),
    "paths numbers": _replace("train/paths", data=np.zeros(12)),
    "paths short": _replace("train/paths", data=np.array(["a"], dtype=object), dtype=STR),
    "stats nan": _set("stats/mean", 5, np.nan),
    "stats inf std": _set("stats/std", 0, np.inf),
    "stats negative std": _set("stats/std", 0, -1.0),
    "stats wrong shape": _replace("stats/mean", data=np.zeros(D - 1)),
    "stats ints": _replace("stats/std", data=np.ones(D, np.int64)),
    "skipped mismatch": _replace("skipped/reasons", data=np.array(["a", "b"], dtype=object), dtype=STR),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A store and a checkpoint trained on it."""
    folder = tmp_path_factory.mktemp("good")
    store = make_store(folder / "s.h5")
    r = CliRunner().invoke(train_main, [str(store), "--out", str(folder / "run"), "--epochs", "1", "--hidden", "4",
                                        "--batch-size", "4", "-q", "--no-progress"])
    assert r.exit_code == 0, r.output
    return store, folder / "run" / LATEST


def _one_error_line(result, what):
    assert result.exit_code == 1, (what, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), (what, result.exception)  # no traceback
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), (what, result.output)
    return lines[0]


def _commands(store: Path, checkpoint: Path, out: Path):
    yield "info", info_main, [str(store)]
    yield "train", train_main, [str(store), "--out", str(out), "--epochs", "1", "--hidden", "4", "-q",
                                "--no-progress", "--standardize"]
    yield "eval", eval_main, [str(checkpoint), str(store)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_damaged_variant_is_one_error_line_naming_the_file(good, tmp_path, variant):
    store = tmp_path / "damaged.h5"
    shutil.copy(good[0], store)
    with h5py.File(store, "r+") as f:
        VARIANTS[variant](f)
    for name, command, args in _commands(store, good[1], tmp_path / "run"):
        line = _one_error_line(CliRunner().invoke(command, args), f"{variant} / {name}")
        assert str(store) in line, (variant, name, line)
    assert not (tmp_path / "run" / LATEST).exists()


def test_nan_pixels_of_a_float_store_are_an_error_in_train_and_eval(good, tmp_path):
    store = make_store(tmp_path / "f.h5", dtype="float32")
    with h5py.File(store, "r+") as f:
        f["train/X"][3, 7] = np.nan
        f["test/X"][2, 0] = np.inf
    r = CliRunner().invoke(train_main, [str(store), "--out", str(tmp_path / "run"), "--epochs", "1", "-q",
                                        "--no-progress", "--eval-split", "none"])
    assert "split 'train' holds non-finite pixel values" in _one_error_line(r, "train")
    r = CliRunner().invoke(eval_main, [str(good[1]), str(store)])
    assert "split 'test' holds non-finite pixel values" in _one_error_line(r, "eval")


# Reads everything h5py can reach in a file: some damaged files crash libhdf5 itself (a segfault
# reading an attribute), which no Python code can catch; those are left out of the test.
_READ_ALL = """
import sys, h5py
def walk(name, item):
    for key in item.attrs:
        item.attrs[key]
    if isinstance(item, h5py.Dataset):
        item[()]
with h5py.File(sys.argv[1], "r") as f:
    walk("/", f)
    f.visititems(walk)
"""


def _libhdf5_survives(path: Path) -> bool:
    return subprocess.run([sys.executable, "-c", _READ_ALL, str(path)], capture_output=True,
                          timeout=60).returncode >= 0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=4))
def test_random_bit_flips_never_give_a_traceback(good, tmp_path, flips):
    data = bytearray(Path(good[0]).read_bytes())
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    store = tmp_path / "flipped.h5"
    store.write_bytes(bytes(data))
    assume(_libhdf5_survives(store))
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    for name, command, args in _commands(store, good[1], tmp_path / "run"):
        result = CliRunner().invoke(command, args)
        if result.exit_code != 0:  # a flip in pixel data or padding may leave a valid store
            _one_error_line(result, f"flips {flips} / {name}")
