"""The layout of a source tree is decided by the folders that hold images, whatever else lies around.

Real downloads carry ``Thumbs.db``, ``.DS_Store``, ``__MACOSX/``, ``desktop.ini`` and README files at
every level; none of them may change which folders are splits and which are classes.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from click.testing import CliRunner
from imagetree import make_tree

from streamnn import open_store
from streamnn.cli.pack import main as pack_main
from streamnn.pack import scan_source

STRAY_FILES = ["Thumbs.db", ".DS_Store", "desktop.ini", "README.md", "notes.txt", "LICENSE"]
IMAGE = b"\xff\xd8\xff\xe0 not decoded by the scan"


def stray(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")


@st.composite
def trees(draw):
    kaggle = draw(st.booleans())
    nested = kaggle and draw(st.booleans())  # training_set/training_set/<class>
    classes = draw(st.lists(st.sampled_from(["cats", "dogs", "birds"]), min_size=2, max_size=3, unique=True))
    splits = {"training_set": "train", "test_set": "test"} if kaggle else {"": "train"}
    counts = {s: {c: draw(st.integers(1, 3)) for c in classes} for s in splits}
    strays = st.lists(st.sampled_from(STRAY_FILES), max_size=2, unique=True)
    levels = draw(st.lists(strays, min_size=4, max_size=4))
    macosx = draw(st.booleans())
    return splits, nested, classes, counts, levels, macosx


def build(root: Path, splits, nested, classes, counts, levels, macosx) -> dict[str, dict[str, int]]:
    """Write the tree; return the expected {split: {class: n}}."""
    expected: dict[str, dict[str, int]] = {}
    stray(root, levels[0])
    if macosx:  # the resource forks of a macOS zip: a mirror of the tree holding only hidden files
        stray(root / "__MACOSX" / "training_set" / classes[0], ["._cat.1.jpg"])
    for folder, split in splits.items():
        top = root / folder if folder else root
        inner = top / folder if nested else top
        stray(top, levels[1])
        stray(inner, levels[2])
        expected[split] = {}
        for c in classes:
            stray(inner / c, levels[3])
            for i in range(counts[folder][c]):
                (inner / c / f"{c}.{i}.jpg").write_bytes(IMAGE)
            expected[split][c] = counts[folder][c]
    return expected


@settings(max_examples=60, deadline=None)
@given(trees())
def test_stray_files_never_change_the_layout(tree):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "k"
        expected = build(root, *tree)
        plan = scan_source(root)
        assert plan.class_names == sorted(tree[2])
        assert sorted(plan.files) == sorted(expected)
        for split, per in expected.items():
            # a stray file inside a class folder is listed, and skipped when it does not decode
            labels = [label for path, label in plan.files[split] if path.endswith(".jpg")]
            assert {c: labels.count(i) for i, c in enumerate(plan.class_names)} == per


def test_the_kaggle_download_with_a_thumbs_db_packs_two_classes(tmp_path):
    """The nested Kaggle layout with a Thumbs.db beside the inner folder: two classes, not three."""
    root = tmp_path / "k"
    make_tree(root, {"training_set/training_set": {"cats": 3, "dogs": 3}, "test_set/test_set": {"cats": 2, "dogs": 2}},
              h=10, w=10)
    (root / "training_set" / "Thumbs.db").write_bytes(b"x")
    (root / "desktop.ini").write_bytes(b"x")
    result = CliRunner().invoke(pack_main, [str(root), "-o", str(tmp_path / "k.h5"), "--size", "8"])
    assert result.exit_code == 0, result.output
    with open_store(tmp_path / "k.h5") as store:
        assert store.class_names == ["cats", "dogs"]
        assert store.counts() == {"train": {"cats": 3, "dogs": 3}, "test": {"cats": 2, "dogs": 2}}


def test_splits_with_different_classes_are_refused_unless_named(tmp_path):
    root = tmp_path / "k"
    make_tree(root, {"training_set": {"cats": 2, "dogs": 2, "birds": 2}, "test_set": {"cats": 1, "dogs": 1}},
              h=10, w=10)
    result = CliRunner().invoke(pack_main, [str(root), "-o", str(tmp_path / "k.h5"), "--size", "8"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("Error: ") and "different classes" in result.output and "--classes" in result.output
    assert not (tmp_path / "k.h5").exists()
    plan = scan_source(root, classes=["cats", "dogs"])
    assert plan.class_names == ["cats", "dogs"]


def test_a_folder_without_images_is_no_class(tmp_path):
    root = tmp_path / "k"
    make_tree(root, {"": {"cats": 2, "dogs": 2}}, h=10, w=10)
    stray(root / "docs", ["README.md", "Thumbs.db"])
    plan = scan_source(root)
    assert plan.class_names == ["cats", "dogs"]
    assert ("docs", "folder holds no images") in plan.skipped
