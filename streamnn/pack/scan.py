"""Scanning SRC (:func:`scan_source`): which files go into which split with which label.

SRC holds split folders (``SRC/training_set/<class>/...``, Kaggle; ``training_set`` becomes
split ``train``, ``test_set`` ``test``, other split folders keep their names) or class folders
(``SRC/<class>/...``: one split, ``train``); download nesting is unwrapped. Files are ordered
by natural sort of their paths; hidden files and folders are ignored (counted, not skipped);
folder links are followed once (:class:`_Lister`). See docs/packing.md for the full rules.

The layout is decided by the folders that hold images (files named as images or starting as
one, at any depth) and by the images they hold, never by other files: the ``Thumbs.db``,
``desktop.ini`` and README files of real downloads change nothing, and a folder that holds no
image is no split and no class (it is reported as skipped). Inside a class folder every file is
packed or skipped by its content. Splits whose classes differ are refused unless ``classes``
names them.
"""
from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from streamnn.errors import StreamnnError
from streamnn.pack.output import within
from streamnn.pack.probe import probe
from streamnn.paths import path_text

KAGGLE_SPLITS = {"training_set": "train", "test_set": "test"}
SPLIT_HINTS = frozenset({"training_set", "test_set", "train", "test", "val", "valid", "validation"})
DEFAULT_SPLIT = "train"
#: File name suffixes of images (as OpenCV reads them): what decides the layout of SRC.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff",
                            ".pbm", ".pgm", ".ppm", ".pnm", ".pxm", ".pfm", ".sr", ".ras", ".jp2", ".exr", ".hdr",
                            ".pic", ".avif"})
NO_IMAGES = "folder holds no images"


def natural_key(text: str) -> tuple:
    """Sort key: digit runs compare as numbers, the rest case-insensitively (cat.2 < cat.10)."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), text


def looks_like_image(path: str) -> bool:
    """The layout's test of a file: named as an image, or a regular file that starts as one (its
    first bytes; the whole content is judged when decoding). Never blocks on a FIFO or device."""
    if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
        return True
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return probe(f.read(512)).format is not None
    except OSError:
        return False


def is_hidden(name: str) -> bool:
    """Names that are ignored silently: dot files and folders, and ``__MACOSX``."""
    return name.startswith(".") or name == "__MACOSX"


@dataclass
class SourcePlan:
    """What :func:`scan_source` found: files per split (natural order) with labels."""

    root: Path
    layout: str                                   # "splits" or "classes"
    class_names: list[str]
    files: dict[str, list[tuple[str, int]]]       # split -> [(path relative to root, label)]
    split_folders: dict[str, str]                 # split -> folder (relative to root)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored_hidden: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        return sum(len(v) for v in self.files.values())

    @property
    def stats_split(self) -> str:
        return DEFAULT_SPLIT if DEFAULT_SPLIT in self.files else sorted(self.files)[0]


class _Lister:
    """Lists folders under SRC and applies the folder-link rule (a folder link is followed once,
    unless it leads back into SRC, to a folder holding SRC, or into or above a folder already
    reached through a link: those are skipped with that reason),
    deciding each link once and remembering the ones not followed."""

    def __init__(self, src: Path) -> None:
        self.real_src = os.path.realpath(src)
        self.followed: list[str] = []            # resolved targets of the folder links followed
        self.decided: dict[str, str | None] = {}  # link path -> None (followed) or why not
        self.hidden_in: dict[str, int] = {}       # folder -> hidden entries (each folder counted once)
        self.images_in: dict[str, bool] = {}      # folder -> whether an image lies anywhere under it

    @property
    def hidden(self) -> int:
        return sum(self.hidden_in.values())

    def link_refusal(self, link: str) -> str | None:
        """Why the folder link ``link`` is not followed, or None to follow it."""
        if link not in self.decided:
            target, why = os.path.realpath(link), None
            if within(target, self.real_src):
                why = "folder link not followed: it leads back into SRC"
            elif within(self.real_src, target):
                why = "folder link not followed: it leads to a folder holding SRC (a loop)"
            elif any(within(target, t) or within(t, target) for t in self.followed):
                why = "folder link not followed: it leads into (or above) a folder already reached by a link"
            else:
                self.followed.append(target)
            self.decided[link] = why
        return self.decided[link]

    def entries(self, folder: str) -> tuple[list[str], list[str]]:
        """Names of the visible subfolders and files of ``folder`` (sorted); hidden entries are
        counted, folder links not followed are left out (see :meth:`refused`)."""
        dirs, files, hidden = [], [], 0
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if is_hidden(e.name):
                        hidden += 1
                    elif e.is_dir():
                        if not (e.is_symlink() and self.link_refusal(e.path)):
                            dirs.append(e.name)
                    else:
                        files.append(e.name)
        except OSError as exc:
            raise StreamnnError(f"cannot list folder ({exc.strerror})", path_text(folder)) from None
        self.hidden_in[folder] = hidden
        return sorted(dirs), sorted(files)

    def holds_images(self, folder: str) -> bool:
        """Whether a file named as an image lies anywhere under ``folder`` (links by the rule above)."""
        if folder not in self.images_in:
            dirs, files = self.entries(folder)
            self.images_in[folder] = (any(looks_like_image(os.path.join(folder, f)) for f in files)
                                      or any(self.holds_images(os.path.join(folder, d)) for d in dirs))
        return self.images_in[folder]

    def layout_entries(self, folder: str) -> tuple[list[str], list[str], list[str]]:
        """What decides the layout at ``folder``: its subfolders that hold images, its image files,
        and (to report) its subfolders that hold none."""
        dirs, files = self.entries(folder)
        with_images = [d for d in dirs if self.holds_images(os.path.join(folder, d))]
        images = [f for f in files if looks_like_image(os.path.join(folder, f))]
        return with_images, images, [d for d in dirs if d not in with_images]

    def walk_files(self, folder: str, prefix: str) -> list[str]:
        """``prefix/...`` paths of all visible files under ``folder``, recursively. Plain
        strings: this runs once per file of the dataset."""
        found, todo = [], [(folder, prefix)]
        while todo:
            here, head = todo.pop()
            dirs, files = self.entries(here)
            found += [f"{head}/{f}" for f in files]
            todo += [(os.path.join(here, d), f"{head}/{d}") for d in reversed(dirs)]
        return found

    def refused(self, root: Path) -> list[tuple[str, str]]:
        """(path relative to ``root``, reason) of every folder link not followed."""
        base = os.fspath(root)
        return [(path_text(Path(os.path.relpath(link, base)).as_posix()), why)
                for link, why in sorted(self.decided.items()) if why is not None]


def _unwrap(lister: _Lister, folder: Path, same_name: bool) -> Path:
    """Descend through folders that hold nothing visible but one subfolder (download nesting);
    return the folder reached."""
    for _ in range(3):
        dirs, files, _ = lister.layout_entries(os.fspath(folder))
        if files or len(dirs) != 1:
            break
        inner = folder / dirs[0]
        if same_name and inner.name != folder.name:
            break
        if not same_name:
            sub_dirs, sub_files, _ = lister.layout_entries(os.fspath(inner))
            if sub_files or not sub_dirs or inner.name in SPLIT_HINTS:
                break
        folder = inner
    return folder


def _class_list(classes: Sequence[str], present: list[str], src: Path) -> list[str]:
    """The ``classes`` asked for, each once, named as the class folders are (path_text form)."""
    names: list[str] = []
    for given in classes:
        name = given.strip()
        if not name:
            raise StreamnnError(f"empty class name in classes {','.join(map(path_text, classes))!r}")
        if name not in present and path_text(name) in present:
            name = path_text(name)
        if name in names:
            raise StreamnnError(f"class {name!r} is given twice in classes")
        names.append(name)
    missing = [c for c in names if c not in present]
    if missing:
        raise StreamnnError(f"class {', '.join(map(repr, missing))} not found (class folders: "
                            f"{', '.join(present)})", path_text(src))
    return names


def scan_source(src: str | os.PathLike, *, classes: Sequence[str] | None = None,
                per_class: int | None = None) -> SourcePlan:
    """Find splits, classes and files under ``src``; raise :class:`StreamnnError` on a bad layout."""
    src = Path(src)
    where = path_text(src)
    if not src.exists():
        raise StreamnnError("no such folder", where)
    if not src.is_dir():
        raise StreamnnError("not a folder (expected a folder of class folders, or of training_set/test_set)", where)
    lister = _Lister(src)
    root = _unwrap(lister, src, same_name=False)
    dirs, _, empty = lister.layout_entries(os.fspath(root))
    if not dirs:
        raise StreamnnError("no class folders holding images (expected SRC/<class>/<image> or "
                            "SRC/training_set/<class>/<image>)", where)
    skipped: list[tuple[str, str]] = [(path_text(d), NO_IMAGES) for d in empty]
    listings = [lister.layout_entries(os.fspath(root / d)) for d in dirs]
    splits_layout = (any(d in SPLIT_HINTS for d in dirs)
                     or all(sub_dirs and not sub_files for sub_dirs, sub_files, _ in listings))
    split_dirs: dict[str, Path] = {}
    if splits_layout:
        for d in dirs:
            name = path_text(KAGGLE_SPLITS.get(d, d))
            if name in split_dirs:
                raise StreamnnError(f"folders {path_text(split_dirs[name].name)!r} and {path_text(d)!r} are both "
                                    f"split {name!r}", path_text(root))
            if name in ("stats", "skipped"):
                raise StreamnnError(f"split folder name {d!r} is reserved; rename it", path_text(root / d))
            split_dirs[name] = _unwrap(lister, root / d, same_name=True)
    else:
        split_dirs[DEFAULT_SPLIT] = root

    found: dict[str, dict[str, list[str]]] = {}
    for split, folder in sorted(split_dirs.items()):
        class_dirs, _, empty = lister.layout_entries(os.fspath(folder))
        _, loose = lister.entries(os.fspath(folder))
        base = _rel(folder, root)
        skipped += [(path_text(f"{base}/{f}" if base else f), "not inside a class folder") for f in loose]
        if splits_layout:
            skipped += [(path_text(f"{base}/{d}"), NO_IMAGES) for d in empty]
        if not class_dirs:
            raise StreamnnError(f"split {split!r} has no class folders", path_text(folder))
        found[split] = {}
        for d in class_dirs:
            files = lister.walk_files(os.fspath(folder / d), f"{base}/{d}" if base else d)
            found[split][path_text(d)] = sorted(files, key=natural_key)
    skipped += lister.refused(root)

    present = sorted({c for per in found.values() for c in per})
    warnings: list[str] = []
    differ = {s: sorted(per) for s, per in found.items() if sorted(per) != present}
    if differ and not classes:
        raise StreamnnError("the splits have different classes (" + "; ".join(
            f"{s}: {', '.join(sorted(found[s]))}" for s in sorted(found)) + "): name the classes to pack with "
            "--classes", where)
    if classes:
        class_names = _class_list(classes, present, src)
        extra = [c for c in present if c not in class_names]
        if extra:
            warnings.append(f"class folders not in --classes, left out: {', '.join(extra)}")
    else:
        class_names = present
    files: dict[str, list[tuple[str, int]]] = {}
    for split, per in found.items():
        items: list[tuple[str, int]] = []
        for label, name in enumerate(class_names):
            paths = per.get(name, [])
            if per_class is not None:
                paths = paths[:per_class]
            if not paths:
                warnings.append(f"split {split!r} has no files of class {name!r}")
            items += [(p, label) for p in paths]
        files[split] = items
    if not any(files.values()):
        raise StreamnnError("no files in any class folder", where)
    return SourcePlan(root=root, layout="splits" if splits_layout else "classes", class_names=class_names,
                      files=files, split_folders={s: path_text(_rel(d, root)) or "." for s, d in split_dirs.items()},
                      skipped=skipped, ignored_hidden=lister.hidden, warnings=warnings)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else ""
