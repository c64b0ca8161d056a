"""streamnn.run.plots: headless PNG figures, written atomically, with a legible layout."""
from __future__ import annotations

import math
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from streamnn.run import plots
from streamnn.atomic import TMP_PREFIX

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TITLE = "misclassified: true -> predicted (probability)"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]


def images(n: int, channels: int = 3, size: int = 16) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def history(epochs: int, *, with_val: bool = True, with_eval: bool = True) -> dict[str, list[float]]:
    e = list(range(1, epochs + 1))
    h: dict[str, list[float]] = {"epoch": [float(x) for x in e],
                                 "train_loss": [2 / math.sqrt(x) for x in e],
                                 "train_accuracy": [1 - 0.8 / math.sqrt(x) for x in e],
                                 "best": [1.0 if x in (1, 2) else 0.0 for x in e]}
    for prefix, on in (("val", with_val), ("eval", with_eval)):
        if on:
            h[f"{prefix}_loss"] = [2.1 / math.sqrt(x) for x in e]
            h[f"{prefix}_accuracy"] = [0.9 - 0.8 / math.sqrt(x) for x in e]
    return h


# --- save_image_grid -------------------------------------------------------------------

@pytest.mark.parametrize("n, channels", [(1, 3), (5, 1), (12, 3)])
def test_image_grid_writes_a_png(tmp_path, n, channels):
    out = tmp_path / "grid.png"
    got = plots.save_image_grid(images(n, channels), [f"{i}->7 0.5" for i in range(n)], out, title=TITLE)
    assert got == out
    width, height = png_size(out)
    assert width >= 100 and height >= 100
    assert no_temp_files(tmp_path)


def test_image_grid_title_adds_height_and_fits_its_width(tmp_path):
    plain, titled = tmp_path / "plain.png", tmp_path / "titled.png"
    plots.save_image_grid(images(1), ["a->b 0.9"], plain, dpi=100)
    plots.save_image_grid(images(1), ["a->b 0.9"], titled, title=TITLE, dpi=100)
    (w0, h0), (w1, h1) = png_size(plain), png_size(titled)
    assert h1 > h0                     # room reserved for the title band
    assert w1 > w0                     # a single cell is widened so the long title is not cut


def _drawn_figure(monkeypatch, **kwargs):
    """Run save_image_grid but keep the Figure instead of writing it."""
    kept = {}

    def keep(fig, path, dpi):
        kept["fig"] = fig
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    plots.save_image_grid(**kwargs)
    fig = kept["fig"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return fig, canvas.get_renderer()


@pytest.mark.parametrize("n", [1, 3, 12])
def test_image_grid_title_and_captions_do_not_overlap(monkeypatch, tmp_path, n):
    captions = [f"some_very_long_file_name_{i:03d}.jpg\nautomobile->truck 0.{90 - i}" for i in range(n)]
    fig, renderer = _drawn_figure(monkeypatch, images=images(n), titles=captions, path=tmp_path / "x.png",
                                  title=TITLE)
    figbox = fig.bbox
    suptitle = fig._suptitle.get_window_extent(renderer)
    caption_boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes]
    image_boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
    for box in [suptitle, *caption_boxes]:          # nothing cut at the figure's edges
        assert box.x0 >= figbox.x0 - 0.5 and box.x1 <= figbox.x1 + 0.5
        assert box.y0 >= figbox.y0 - 0.5 and box.y1 <= figbox.y1 + 0.5
    for box in caption_boxes:                       # the title sits above every caption
        assert suptitle.y0 >= box.y1
    boxes = caption_boxes + image_boxes             # no caption overlaps another caption or an image
    for i, a in enumerate(caption_boxes):
        for j, b in enumerate(boxes):
            if i != j:
                overlap_w = min(a.x1, b.x1) - max(a.x0, b.x0)
                overlap_h = min(a.y1, b.y1) - max(a.y0, b.y0)
                assert overlap_w <= 0.5 or overlap_h <= 0.5, (i, j)


def test_long_captions_keep_their_end(monkeypatch, tmp_path):
    fig, _ = _drawn_figure(monkeypatch, images=images(2), titles=["x" * 80 + "_042.jpg\ncat->dog 0.97", "ok"],
                           path=tmp_path / "x.png")
    first = fig.axes[0].title.get_text().split("\n")
    assert first[0].startswith("\u2026") and first[0].endswith("_042.jpg") and len(first[0]) < 80
    assert first[1] == "cat->dog 0.97"
    assert fig.axes[1].title.get_text() == "ok"


def test_image_grid_rejects_no_images(tmp_path):
    with pytest.raises(ValueError):
        plots.save_image_grid([], None, tmp_path / "none.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_previous_file_and_no_temp(monkeypatch, tmp_path):
    out = tmp_path / "grid.png"
    plots.save_image_grid(images(2), None, out)
    before = out.read_bytes()

    from matplotlib.figure import Figure

    def half_write(self, fname, **kwargs):
        Path(fname).write_bytes(PNG_MAGIC)  # a partial file, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_write)
    with pytest.raises(OSError, match="disk full"):
        plots.save_image_grid(images(3), None, out, title="again")
    assert out.read_bytes() == before
    assert no_temp_files(tmp_path)


# --- save_curves -----------------------------------------------------------------------

def test_curves_png(tmp_path):
    out = tmp_path / "curves.png"
    assert plots.save_curves(history(5), out, eval_name="test") == out
    assert png_size(out) == (1000, 400)  # 10 x 4 inches at 100 dpi
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("with_val", [True, False])
def test_curves_without_eval_columns(tmp_path, with_val):
    out = tmp_path / "curves.png"
    plots.save_curves(history(3, with_val=with_val, with_eval=False), out)
    assert png_size(out) == (1000, 400)
    assert no_temp_files(tmp_path)


def test_curves_with_nan_eval_and_no_best_column(tmp_path):
    h = history(4)
    h["eval_loss"] = h["eval_accuracy"] = [float("nan")] * 4
    del h["best"]
    out = tmp_path / "curves.png"
    plots.save_curves(h, out)
    assert png_size(out) == (1000, 400)


def test_curves_single_epoch_and_overwrite(tmp_path):
    out = tmp_path / "curves.png"
    plots.save_curves(history(1), out)
    first = out.read_bytes()
    plots.save_curves(history(6), out)
    assert out.read_bytes() != first and png_size(out) == (1000, 400)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_train_uses_plots_save_curves():
    import streamnn.run.trainer as train

    assert not hasattr(train, "save_curves")  # one implementation, in streamnn.run.plots


# --- callers and package ---------------------------------------------------------------

def test_eval_errors_grid_has_a_title(monkeypatch, tmp_path):
    from streamnn.cli import eval as cli_eval

    seen = {}
    monkeypatch.setattr(plots, "save_image_grid", lambda *a, **kw: seen.update(kw))
    errors = SimpleNamespace(images=list(images(2)), titles=["a->b 0.9", "b->a 0.8"])
    assert cli_eval._save_errors(str(tmp_path / "e.png"), errors, "BGR") == str(tmp_path / "e.png")
    assert "true -> predicted" in seen["title"]


def test_import_streamnn_does_not_import_matplotlib():
    code = ("import sys, streamnn\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
            "missing = [n for n in streamnn.__all__ if not hasattr(streamnn, n)]\n"
            "assert not missing, missing\n")
    subprocess.run([sys.executable, "-c", code], check=True)
