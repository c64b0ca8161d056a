"""The command-line tools: streamnn-pack exit codes and messages, streamnn-info text, JSON and grid."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from imagetree import encode, make_tree
from streamnn import open_store
from streamnn.cli.info import main as info
from streamnn.cli.pack import main as pack_cli


def run(cli, *args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    make_tree(root, {"training_set": {"cats": 5, "dogs": 4}, "test_set": {"cats": 2, "dogs": 2}}, h=20, w=24)
    (root / "training_set" / "cats" / "_DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


@pytest.fixture(scope="module")
def store(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s.h5"
    r = run(pack_cli, src, "-o", out, "--size", "8", "--workers", "1", "--max-skip-fraction", "0.2")
    assert r.exit_code == 0, r.output
    return out


def test_pack_cli_summary_and_command(store, src):
    r = run(pack_cli, src, "-o", store.parent / "t.h5", "--size", "8", "--workers", "2",
            "--max-skip-fraction", "0.2", "--dtype", "uint8", "--seed", "5")
    assert r.exit_code == 0, r.output
    assert "13 images of 8x8x3" in r.output and "images/s" in r.output
    assert "train" in r.output and "Skipped 1 file(s)" in r.output and "_DS_Store: not an image" in r.output
    with open_store(store.parent / "t.h5") as s:
        assert s.command.startswith("streamnn-pack ") and "--dtype uint8" in s.command
        assert s.dtype == "uint8" and s.options["seed"] == 5


@pytest.mark.parametrize("args,message", [
    (["{tmp}/missing", "-o", "{tmp}/o.h5"], "missing: no such folder"),
    (["{tmp}", "-o", "{tmp}/o.h5"], "no class folders"),
    (["{src}", "-o", "{store}"], "already exists (use --force"),
    (["{src}", "-o", "{tmp}/o.h5"], "2 of 15 files could not be packed"),  # default fraction 0.1, 2 bad files
    (["{src}", "-o", "{tmp}/o.h5", "--classes", "cats,cows", "--max-skip-fraction", "0.5"], "'cows' not found"),
    (["{src}", "-o", "{tmp}/o.h5", "--size", "big"], "bad size 'big'"),
])
def test_pack_cli_errors_are_one_line_and_exit_1(tmp_path, src, store, args, message):
    if "2 of 15" in message:
        (src / "test_set" / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    try:
        r = run(pack_cli, *[a.format(tmp=tmp_path, src=src, store=store) for a in args])
    finally:
        (src / "test_set" / "dogs" / "broken.jpg").unlink(missing_ok=True)
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and message in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "o.h5").exists()


def test_pack_cli_no_usable_image(tmp_path):
    (tmp_path / "src" / "cats").mkdir(parents=True)
    (tmp_path / "src" / "cats" / "a.jpg").write_bytes(b"")
    r = run(pack_cli, tmp_path / "src", "-o", tmp_path / "o.h5", "--max-skip-fraction", "1")
    assert r.exit_code == 1 and "no usable image" in r.output


def test_pack_cli_help_explains_every_option():
    r = run(pack_cli, "--help")
    assert r.exit_code == 0
    for flag in ("--size", "--per-class", "--classes", "--dtype", "--compression", "--seed", "--workers", "--force",
                 "--max-pixels", "--max-skip-fraction", "--grayscale", "--ignore-exif-orientation",
                 "--full-decode", "training_set", "squashed", "natural sort"):
        assert flag in r.output, flag


def test_info_text(store):
    r = run(info, store)
    assert r.exit_code == 0, r.output
    out = r.output
    for needle in ("0=cats, 1=dogs", "8x8x3 BGR", "float32", "MB on disk", "train", "test",
                   "skipped      1 file(s)", "training_set/cats/_DS_Store: not an image", "command      streamnn-pack",
                   "fingerprint", "stats        per-feature mean/std of split 'train'"):
        assert needle in out, needle
    line = next(x for x in out.splitlines() if x.strip().startswith("train "))
    assert line.split()[1:] == ["5", "4", "9"]


def test_info_json(store):
    r = run(info, store, "--json", "--verify")
    d = json.loads(r.output)
    assert d["counts"] == {"test": {"cats": 2, "dogs": 2}, "train": {"cats": 5, "dogs": 4}}
    assert d["image_shape"] == [8, 8, 3] and d["dtype"] == "float32" and d["size_bytes"] == os.path.getsize(store)
    assert d["skipped"] == [{"path": "training_set/cats/_DS_Store", "reason": "not an image (unrecognized format)"}]
    assert len(d["fingerprint"]) == 64 and d["options"]["size"] == [8, 8]


def test_info_errors(tmp_path, store):
    r = run(info, tmp_path / "none.h5")
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "no such store file" in r.output
    (tmp_path / "text.h5").write_text("hello")
    r = run(info, tmp_path / "text.h5")
    assert r.exit_code == 1 and "not an HDF5 file" in r.output
    r = run(info, store, "--grid", tmp_path / "g.png", "--split", "valid")
    assert r.exit_code == 1 and "unknown split 'valid'" in r.output


def test_grid_shows_rgb_colors_and_class_names(tmp_path):
    """Pure BGR red and blue images must come out red and blue in the PNG (BGR -> RGB)."""
    for cls, bgr in (("reds", (0, 0, 255)), ("blues", (255, 0, 0))):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "src" / cls / f"{i}.png").write_bytes(encode(np.full((16, 16, 3), bgr, np.uint8), ".png"))
    out = tmp_path / "s.h5"
    assert run(pack_cli, tmp_path / "src", "-o", out, "--size", "8", "--workers", "1").exit_code == 0
    png = tmp_path / "grid.png"
    r = run(info, out, "--grid", png, "--n", "6")
    assert r.exit_code == 0, r.output and "6 images of 'train'" in r.output
    img = cv2.imread(str(png))  # BGR again
    reddish = (img[..., 2] > 200) & (img[..., 0] < 60) & (img[..., 1] < 60)
    bluish = (img[..., 0] > 200) & (img[..., 2] < 60) & (img[..., 1] < 60)
    assert reddish.sum() > 500 and bluish.sum() > 500
    assert reddish.sum() == pytest.approx(bluish.sum(), rel=0.1)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".streamnn-tmp")]


def test_grid_of_a_grayscale_store(tmp_path, src):
    out = tmp_path / "g.h5"
    assert run(pack_cli, src, "-o", out, "--size", "8", "--grayscale", "--workers", "1",
               "--max-skip-fraction", "0.5").exit_code == 0
    r = run(info, out, "--grid", tmp_path / "g.png", "--split", "test", "--n", "50")
    assert r.exit_code == 0 and "4 images of 'test'" in r.output and (tmp_path / "g.png").stat().st_size > 0
