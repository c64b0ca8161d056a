"""Packing: round trips, determinism, layouts, options, bad files, atomicity and interruption."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from imagetree import bad_files, encode, make_tree, pil_bytes, smooth_image
from streamnn import StreamnnError, open_store
from streamnn.atomic import TMP_PREFIX
from streamnn.data.writer import StoreWriter
from streamnn.pack.job import RunningMoments, pack
from streamnn.pack.pool import Decoder
from streamnn.pack.scan import natural_key, scan_source

KAGGLE = {"training_set": {"cats": 7, "dogs": 6}, "test_set": {"cats": 3, "dogs": 4}}


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("kaggle")
    return root, make_tree(root, KAGGLE)


@pytest.fixture(scope="module")
def packed(kaggle, tmp_path_factory) -> Path:
    """The Kaggle tree packed at full decoding (so pixels are exactly OpenCV's), two workers."""
    out = tmp_path_factory.mktemp("out") / "s.h5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Decoder, "decode_while_booting", False)
        pack(kaggle[0], out, size=(12, 16), reduced_decoding=False, workers=2, seed=3)
    return out


def reference_row(path: Path, size: tuple[int, int]) -> np.ndarray:
    img = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA).reshape(-1)


def test_round_trip_values_labels_paths_and_attributes(kaggle, packed):
    root, _ = kaggle
    with open_store(packed) as s:
        assert s.splits == ["test", "train"] and s.class_names == ["cats", "dogs"]
        assert s.image_shape == (12, 16, 3) and s.channel_order == "BGR" and s.dtype == "float32"
        assert s.counts() == {"train": {"cats": 7, "dogs": 6}, "test": {"cats": 3, "dogs": 4}}
        for split, folder in (("train", "training_set"), ("test", "test_set")):
            paths, y = s.paths(split), s.labels(split)
            X = s.read_rows(split, np.arange(s.n_rows(split)))
            assert sorted(paths) == sorted(p for p in kaggle[1] if p.startswith(folder + "/"))
            for row, path, label in zip(X, paths, y):
                assert path.split("/")[1] == s.class_names[label]
                np.testing.assert_allclose(row, reference_row(root / path, (12, 16)) / 255.0, atol=1e-6)
        assert s.skipped() == []
        assert s.command == f"streamnn.pack.pack({str(root)!r}, {str(packed)!r}, size=(12, 16), dtype='float32', seed=3)"
        opts = s.options
        assert opts["size"] == [12, 16] and opts["seed"] == 3 and opts["resize"] == "squash"
        assert opts["exif_orientation"] == "apply" and opts["reduced_decoding"] is False
        assert opts["split_folders"] == {"train": "training_set", "test": "test_set"}
        assert opts["stats_split"] == "train" and opts["layout"] == "splits"
        assert "pack(" in s.command
        s.verify()


def test_stats_equal_numpy_on_the_training_split(packed):
    with open_store(packed) as s:
        X = s.read_rows("train", np.arange(s.n_rows("train"))).astype(np.float64)
        mean, std = s.stats()
    np.testing.assert_allclose(mean, X.mean(axis=0), atol=1e-7)
    np.testing.assert_allclose(std, X.std(axis=0), atol=1e-7)


def test_running_moments_match_numpy_for_uneven_batches_and_offsets():
    rng = np.random.default_rng(1)
    data = rng.integers(200, 256, (1000, 7), dtype=np.uint8)  # large mean, small spread
    m = RunningMoments(7)
    for a, b in ((0, 1), (1, 300), (300, 301), (301, 1000)):
        m.update(data[a:b])
    x = data / 255.0
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(m.std, x.std(0), rtol=1e-12)
    assert m.n == 1000


def test_rows_are_shuffled_deterministically_by_seed(kaggle, tmp_path):
    def order(seed: int, name: str) -> list[str]:
        pack(kaggle[0], tmp_path / name, size=8, workers=1, seed=seed)
        with open_store(tmp_path / name) as s:
            return s.paths("train")

    a, b, c = order(3, "a.h5"), order(3, "b.h5"), order(4, "c.h5")
    assert a == b and a != c
    classes = [p.split("/")[1] for p in a]
    assert classes != sorted(classes)  # interleaved, not one class after the other


@pytest.mark.parametrize("while_booting", [False, True])
def test_same_store_with_one_or_two_workers(kaggle, tmp_path, monkeypatch, while_booting):
    monkeypatch.setattr(Decoder, "decode_while_booting", while_booting)  # False: every chunk goes to the pool
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    pack(kaggle[0], one, size=(12, 16), workers=1, seed=3)
    r2 = pack(kaggle[0], two, size=(12, 16), workers=2, seed=3)
    with h5py.File(one, "r") as f, h5py.File(two, "r") as g:
        for split in ("train", "test"):
            for key in ("X", "y", "paths"):
                assert np.array_equal(f[split][key][...], g[split][key][...]), (split, key)
        assert f.attrs["fingerprint"] == g.attrs["fingerprint"] == r2.fingerprint
        assert np.array_equal(f["stats/mean"][...], g["stats/mean"][...])


def test_dtypes_agree_up_to_rounding(kaggle, tmp_path):
    rows = {}
    for dtype in ("float32", "uint8", "float16"):
        pack(kaggle[0], tmp_path / f"{dtype}.h5", size=8, dtype=dtype, workers=1)
        with open_store(tmp_path / f"{dtype}.h5") as s:
            assert s.dtype == dtype
            rows[dtype] = s.read_rows("train", np.arange(13))
            if dtype == "uint8":
                assert s.dataset("train").dtype == np.uint8
    np.testing.assert_allclose(rows["uint8"], rows["float32"], atol=1e-7)
    np.testing.assert_allclose(rows["float16"], rows["float32"], atol=5e-4)


def test_compression_is_optional(kaggle, tmp_path):
    pack(kaggle[0], tmp_path / "c.h5", size=8, compression="lzf", workers=1)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f["train/X"].compression == "lzf"
    with open_store(tmp_path / "c.h5") as s:
        assert s.n_rows("train") == 13


@pytest.mark.parametrize("options, message", [
    (dict(dtype="int8"), "unknown dtype 'int8' (choose from float32, float16, uint8)"),
    (dict(compression="zstd"), "unknown compression 'zstd' (choose from None, lzf, gzip)")])
def test_unknown_dtype_or_compression_is_refused_before_anything_is_written(kaggle, tmp_path, options, message):
    for write in (lambda: pack(kaggle[0], tmp_path / "s.h5", size=8, workers=1, **options),
                  lambda: StoreWriter(tmp_path / "s.h5", class_names=["a"], image_shape=(2, 2, 3), **options)):
        with pytest.raises(StreamnnError) as info:
            write()
        assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []


def test_natural_sort_and_per_class(tmp_path):
    make_tree(tmp_path / "src", {"": {"cats": 12, "dogs": 3}}, h=10, w=10)
    (tmp_path / "src" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "src" / "dogs" / "._dog.1.jpg").write_bytes(b"x")
    plan = scan_source(tmp_path / "src", per_class=3)
    assert plan.ignored_hidden == 2 and plan.layout == "classes" and plan.split_folders == {"train": "."}
    assert [p for p, _ in plan.files["train"]] == [
        "cats/cat.1.jpg", "cats/cat.2.jpg", "cats/cat.3.jpg", "dogs/dog.1.jpg", "dogs/dog.2.jpg", "dogs/dog.3.jpg"]
    assert sorted(["cat.10", "cat.2", "Cat.1"], key=natural_key) == ["Cat.1", "cat.2", "cat.10"]
    r = pack(tmp_path / "src", tmp_path / "s.h5", size=8, per_class=3, workers=1)
    assert r.counts == {"train": {"cats": 3, "dogs": 3}}
    with open_store(tmp_path / "s.h5") as s:
        assert s.options["per_class"] == 3


def test_classes_option_fixes_the_label_order_and_selects(tmp_path):
    make_tree(tmp_path / "src", {"": {"cats": 2, "dogs": 3, "birds": 1}}, h=10, w=10)
    r = pack(tmp_path / "src", tmp_path / "s.h5", size=8, classes=["dogs", "cats"], workers=1)
    assert r.class_names == ["dogs", "cats"] and r.counts == {"train": {"dogs": 3, "cats": 2}}
    assert any("birds" in w for w in r.warnings)
    with open_store(tmp_path / "s.h5") as s:
        assert all(p.split("/")[0] == s.class_names[k] for p, k in zip(s.paths("train"), s.labels("train")))
    with pytest.raises(StreamnnError, match="'cows' not found"):
        pack(tmp_path / "src", tmp_path / "t.h5", classes=["cats", "cows"])
    assert not (tmp_path / "t.h5").exists()


def test_more_than_two_classes_default_to_sorted_names(tmp_path):
    make_tree(tmp_path / "src", {"": {"zebra": 1, "ant": 2, "moth": 1}}, h=10, w=10)
    r = pack(tmp_path / "src", tmp_path / "s.h5", size=8, workers=1)
    assert r.class_names == ["ant", "moth", "zebra"]


def test_a_class_missing_from_a_split_is_refused_unless_the_classes_are_named(tmp_path):
    make_tree(tmp_path / "src", {"training_set": {"cats": 2, "dogs": 2}, "test_set": {"cats": 2}}, h=10, w=10)
    with pytest.raises(StreamnnError, match="different classes"):
        pack(tmp_path / "src", tmp_path / "s.h5", size=8, workers=1)
    assert not (tmp_path / "s.h5").exists()
    r = pack(tmp_path / "src", tmp_path / "s.h5", size=8, workers=1, classes=["cats", "dogs"])
    assert r.counts["test"] == {"cats": 2, "dogs": 0}
    assert r.warnings == ["split 'test' has no files of class 'dogs'"]
    assert "Warning: split 'test' has no files" in r.summary()


@pytest.mark.parametrize("layout,splits", [
    ({"dataset/training_set": {"cats": 1, "dogs": 1}, "dataset/test_set": {"cats": 1, "dogs": 1}}, ["test", "train"]),
    ({"training_set/training_set": {"cats": 1, "dogs": 1}, "test_set/test_set": {"cats": 1, "dogs": 1}},
     ["test", "train"]),
    ({"train": {"cats": 1, "dogs": 1}, "val": {"cats": 1, "dogs": 1}}, ["train", "val"]),
    ({"fold1": {"cats": 1, "dogs": 1}, "fold2": {"cats": 1, "dogs": 1}}, ["fold1", "fold2"]),
    ({"": {"cats": 1, "dogs": 1}}, ["train"]),
    ({"download/photos": {"cats": 1, "dogs": 1}}, ["train"]),
])
def test_layouts(tmp_path, layout, splits):
    make_tree(tmp_path / "src", layout, h=10, w=10)
    plan = scan_source(tmp_path / "src")
    assert sorted(plan.files) == splits and plan.class_names == ["cats", "dogs"]
    for items in plan.files.values():
        assert all(p.split("/")[-2] == plan.class_names[k] for p, k in items)


def test_layout_errors(tmp_path):
    with pytest.raises(StreamnnError, match="no such folder"):
        pack(tmp_path / "missing", tmp_path / "s.h5")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StreamnnError, match="not a folder"):
        pack(tmp_path / "file", tmp_path / "s.h5")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(encode(smooth_image(1)))
    with pytest.raises(StreamnnError, match="no class folders"):
        pack(tmp_path / "flat", tmp_path / "s.h5")
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(StreamnnError, match="no class folders holding images"):
        pack(tmp_path / "empty", tmp_path / "s.h5")
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "flat"]


def test_bad_file_zoo_is_skipped_listed_and_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(Decoder, "decode_while_booting", False)  # reasons come back from the workers
    src = tmp_path / "src"
    make_tree(src, {"training_set": {"cats": 10, "dogs": 10}, "test_set": {"cats": 2, "dogs": 2}}, h=20, w=24)
    bad = bad_files()
    for name, content in bad.items():
        (src / "training_set" / "cats" / name).write_bytes(content)
    (src / "training_set" / "README.txt").write_text("loose file")
    img = smooth_image(9, 20, 24, warm=False)
    good_odd = {"rgba.png": encode(np.dstack([img, np.full((20, 24), 9, np.uint8)]), ".png"),
                "deep.png": encode(img.astype(np.uint16) * 257, ".png"), "gray.png": encode(img[..., 1], ".png"),
                "cmyk.jpg": pil_bytes(img, "JPEG", mode="CMYK"), "pic.bmp": encode(img, ".bmp"),
                "upper.JPEG": encode(img)}
    for name, content in good_odd.items():
        (src / "training_set" / "dogs" / name).write_bytes(content)
    for hidden in (".DS_Store", "._cat.1.jpg"):
        (src / "training_set" / "cats" / hidden).write_bytes(b"\x00junk")
    (src / "__MACOSX" / "training_set").mkdir(parents=True)
    (src / "__MACOSX" / "training_set" / "._x.jpg").write_bytes(b"junk")
    (src / "test_set" / ".git").mkdir()

    out = tmp_path / "s.h5"
    r = pack(src, out, size=8, workers=2, max_skip_fraction=0.5)
    n_bad = len(bad) + 1
    assert r.counts == {"train": {"cats": 10, "dogs": 16}, "test": {"cats": 2, "dogs": 2}}
    assert len(r.skipped) == n_bad and r.ignored_hidden == 4
    with open_store(out) as s:
        skipped = dict(s.skipped())
        assert s.options["ignored_hidden"] == 4
    assert skipped["training_set/README.txt"] == "not inside a class folder"
    assert skipped["training_set/cats/truncated.jpg"] == "truncated JPEG (no end-of-image marker)"
    assert "too large" in skipped["training_set/cats/bomb.jpg"]
    assert set(skipped) == {f"training_set/cats/{n}" for n in bad} | {"training_set/README.txt"}
    text = r.summary()
    assert f"Skipped {n_bad} file(s)" in text and "empty.jpg: empty file" in text and "Ignored 4 hidden" in text


def test_too_many_skipped_files_is_an_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(Decoder, "decode_while_booting", False)
    make_tree(tmp_path / "src", {"": {"cats": 8, "dogs": 8}}, h=10, w=10)
    for i in range(2):
        (tmp_path / "src" / "cats" / f"bad{i}.jpg").write_bytes(b"not an image")
    with pytest.raises(StreamnnError, match=r"2 of 18 files could not be packed.*max-skip-fraction 0\.1"):
        pack(tmp_path / "src", tmp_path / "s.h5", size=8, workers=2, max_skip_fraction=0.1)
    assert sorted(os.listdir(tmp_path)) == ["src"]
    r = pack(tmp_path / "src", tmp_path / "s.h5", size=8, workers=1, max_skip_fraction=0.2)
    assert len(r.skipped) == 2 and r.n_images == 16


def test_no_usable_image_is_an_error(tmp_path):
    (tmp_path / "src" / "cats").mkdir(parents=True)
    (tmp_path / "src" / "cats" / "a.jpg").write_bytes(b"text")
    with pytest.raises(StreamnnError, match="could not be packed|no usable image"):
        pack(tmp_path / "src", tmp_path / "s.h5", workers=1)
    with pytest.raises(StreamnnError, match="no usable image"):
        pack(tmp_path / "src", tmp_path / "s.h5", workers=1, max_skip_fraction=1.0)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_existing_output_needs_force_and_force_replaces_only_a_store(kaggle, tmp_path):
    out = tmp_path / "s.h5"
    out.write_bytes(b"previous")
    with pytest.raises(StreamnnError, match="already exists"):
        pack(kaggle[0], out, size=8, workers=1)
    with pytest.raises(StreamnnError, match="not a readable streamnn store"):
        pack(kaggle[0], out, size=8, workers=1, force=True)
    assert out.read_bytes() == b"previous"
    out.unlink()
    pack(kaggle[0], out, size=4, workers=1)
    pack(kaggle[0], out, size=8, workers=1, force=True)
    with open_store(out) as s:
        assert s.n_rows("train") == 13 and s.image_shape == (8, 8, 3)
    with pytest.raises(StreamnnError, match="is a folder"):
        pack(kaggle[0], tmp_path, size=8, force=True)
    with pytest.raises(StreamnnError, match="does not exist"):
        pack(kaggle[0], tmp_path / "no" / "s.h5", size=8)


def test_grayscale_and_non_square(kaggle, tmp_path):
    pack(kaggle[0], tmp_path / "g.h5", size="6x10", grayscale=True, workers=1, reduced_decoding=False)
    with open_store(tmp_path / "g.h5") as s:
        assert s.image_shape == (6, 10, 1) and s.channel_order == "GRAY"
        row = s.read_rows("train", [0])[0]
        path = kaggle[0] / s.paths("train")[0]
    gray = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_GRAYSCALE)
    expected = cv2.resize(gray, (10, 6), interpolation=cv2.INTER_AREA).reshape(-1) / 255.0
    np.testing.assert_allclose(row, expected, atol=1e-6)


def test_no_train_split_takes_stats_from_the_first_split(tmp_path):
    make_tree(tmp_path / "src", {"test": {"cats": 2, "dogs": 1}, "val": {"cats": 1, "dogs": 1}}, h=10, w=10)
    pack(tmp_path / "src", tmp_path / "s.h5", size=4, workers=1)
    with open_store(tmp_path / "s.h5") as s:
        assert s.options["stats_split"] == "test"
        X = s.read_rows("test", range(3)).astype(np.float64)
        np.testing.assert_allclose(s.stats()[0], X.mean(0), atol=1e-7)


def test_stale_temp_files_of_killed_runs_are_removed(kaggle, tmp_path):
    out = tmp_path / "s.h5"
    stale, fresh, other = (tmp_path / f"{TMP_PREFIX}s.h5.old", tmp_path / f"{TMP_PREFIX}s.h5.new",
                           tmp_path / f"{TMP_PREFIX}t.h5.old")
    for p in (stale, fresh, other):
        p.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600,) * 2)
    os.utime(other, (time.time() - 3600,) * 2)
    os.utime(fresh, (time.time() + 3600,) * 2)  # "modified after this run started": another live run
    r = pack(kaggle[0], out, size=8, workers=1)
    assert r.stale_removed == [stale]
    assert not stale.exists() and fresh.exists() and other.exists()


def test_interrupt_in_the_parent_terminates_the_pool_and_writes_nothing(kaggle, tmp_path, monkeypatch):
    monkeypatch.setattr(Decoder, "decode_while_booting", False)
    out = tmp_path / "s.h5"
    pack(kaggle[0], out, size=4, workers=1)
    previous = out.read_bytes()

    def progress(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(kaggle[0], out, size=8, workers=2, force=True, progress=progress)
    assert sorted(os.listdir(tmp_path)) == ["s.h5"] and out.read_bytes() == previous


PACK_CLI = [sys.executable, "-m", "streamnn.cli.pack"]


def test_a_fifo_among_images_is_skipped_without_blocking(tmp_path):
    """Reading a FIFO would wait forever for a writer: it is refused by its type, unread."""
    src = tmp_path / "src"
    make_tree(src, {"": {"cats": 6, "dogs": 6}}, h=10, w=10)
    os.mkfifo(src / "cats" / "pipe.jpg")
    out = tmp_path / "s.h5"
    r = subprocess.run([*PACK_CLI, str(src), "-o", str(out), "--size", "8", "--workers", "1",
                        "--max-skip-fraction", "0.2"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    with open_store(out) as s:
        assert dict(s.skipped()) == {"cats/pipe.jpg": "not a regular file (a FIFO, socket or device)"}
        assert s.counts() == {"train": {"cats": 6, "dogs": 6}}


def test_options_and_summary_are_json_and_text(packed):
    with h5py.File(packed, "r") as f:
        options = json.loads(f.attrs["options"])
        counts = json.loads(f.attrs["counts"])
    assert options["dtype"] == "float32" and counts["train"] == {"cats": 7, "dogs": 6}
    assert options["max_pixels"] == 89_478_485 and options["interpolation"] == "INTER_AREA"
