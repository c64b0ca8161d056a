"""Figures saved to image files, headless (matplotlib's Agg canvas, no pyplot state).

Each function builds its own :class:`~matplotlib.figure.Figure`, draws, and saves it
atomically (temporary file, then rename), so nothing depends on a display or on global
figure state. Images come in OpenCV's channel order (BGR) and are converted to RGB here.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from streamnn.atomic import atomic_output


def check_figure_path(path: str | os.PathLike) -> None:
    """Raise StreamnnError unless a figure can be saved to ``path``: a format matplotlib writes
    (by the suffix; none means PNG), an existing folder, and no folder or special file there.
    Cheap: commands call it before their work, so a bad name fails at once."""
    from streamnn.errors import StreamnnError
    from streamnn.paths import path_text

    p = Path(path)
    fmt = p.suffix.lstrip(".").lower() or "png"
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if fmt not in formats:
        raise StreamnnError(f"cannot save a figure as .{fmt} (choose one of "
                            f"{', '.join('.' + f for f in sorted(formats))})", path_text(p))
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise StreamnnError("the folder to save it in does not exist", path_text(p))
    if os.path.lexists(p) and not p.is_file():
        raise StreamnnError("exists and is not a regular file", path_text(p))


def _save(fig: Figure, path: str | os.PathLike, dpi: int, metadata: Mapping[str, str] | None = None) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_output(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, metadata=dict(metadata) if metadata else None)
    return path


_CAPTION_PT = 7.0     # caption font size (points)
_TITLE_PT = 10.0      # figure title font size (points)
_CHAR_WIDTH = 0.6     # average glyph width of the default sans font, in font sizes (generous)
_LINE_HEIGHT = 1.3    # line height, in font sizes


def _fit(line: str, max_chars: int) -> str:
    """``line`` cut to ``max_chars``, keeping its end (file numbers, predicted class, score)."""
    return line if len(line) <= max_chars else "\u2026" + line[len(line) - max_chars + 1:]


def save_image_grid(images: np.ndarray | Sequence[np.ndarray], titles: Sequence[str] | None,
                    path: str | os.PathLike, *, channel_order: str = "BGR", ncols: int | None = None,
                    title: str | None = None, cell_inches: float = 1.3, dpi: int = 100) -> Path:
    """Save uint8 images (N, H, W, C) with C = 3 (``channel_order`` "BGR" or "RGB") or 1 (gray)
    as a grid, each captioned by its title (lines too long for a cell keep their end), under
    an optional figure ``title``. Returns the path written.

    The layout is computed, not left to a layout engine: a band at the top holds the title,
    and every row reserves room above its images for its captions, so nothing overlaps.
    """
    images = [np.asarray(im) for im in images]
    if not images:
        raise ValueError("no images to plot")
    captions = [str(t) for t in titles] if titles is not None else [""] * len(images)
    n = len(images)
    ncols = ncols or min(n, max(1, math.ceil(math.sqrt(n * 4 / 3))))
    nrows = math.ceil(n / ncols)
    pt = 1 / 72  # inches per point
    max_chars = max(4, int(cell_inches * 0.95 / (_CAPTION_PT * _CHAR_WIDTH * pt)))
    captions = ["\n".join(_fit(line, max_chars) for line in c.split("\n")) for c in captions]
    lines = max((c.count("\n") + 1 for c in captions if c), default=0)
    caption_h = lines * _CAPTION_PT * _LINE_HEIGHT * pt + (0.06 if lines else 0.0)
    title_h = _TITLE_PT * _LINE_HEIGHT * pt + 0.12 if title else 0.0
    margin = 0.08
    width = max(ncols * cell_inches, len(title or "") * _TITLE_PT * _CHAR_WIDTH * pt + 0.3) + 2 * margin
    height = title_h + nrows * (caption_h + cell_inches) + 2 * margin
    fig = Figure(figsize=(width, height))
    grid_w = ncols * cell_inches
    left = (width - grid_w) / 2
    fig.subplots_adjust(left=left / width, right=(left + grid_w) / width, bottom=margin / height,
                        top=1 - (margin + title_h + caption_h) / height,
                        hspace=caption_h / cell_inches, wspace=0.05)
    for i, (im, caption) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        if im.ndim == 3 and im.shape[2] == 1:
            im = im[:, :, 0]
        if im.ndim == 2:
            ax.imshow(im, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(im[:, :, ::-1] if channel_order.upper() == "BGR" else im, interpolation="nearest")
        ax.set_title(caption, fontsize=_CAPTION_PT, pad=2)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=_TITLE_PT, y=1 - margin / height, va="top")
    return _save(fig, path, dpi)


def save_curves(history: Mapping[str, Sequence[float]], path: str | os.PathLike, eval_name: str = "eval",
                *, dpi: int = 100, metadata: Mapping[str, str] | None = None) -> Path:
    """Loss and accuracy per epoch for train, validation and evaluation data, side by side.

    ``history`` maps column names to per-epoch values: ``epoch``, and any of
    ``{train,val,eval}_{loss,accuracy}`` (missing or all-NaN series are not drawn) and
    ``best`` (1.0 where that epoch's checkpoint became the best: a dashed line marks the last).
    ``metadata`` is stored in the file (PNG text chunks). Returns the path written.
    """
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4))
    epochs = list(history.get("epoch", ()))
    best = [e for e, b in zip(epochs, history.get("best", ())) if b == 1.0]
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        if best:
            ax.axvline(best[-1], color="0.6", linestyle="--", linewidth=1, label="best checkpoint")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for prefix, label in (("train", "train"), ("val", "validation"), ("eval", eval_name)):
            values = np.array(history.get(f"{prefix}_{metric}", ()), float)
            if len(values) and len(values) == len(epochs) and not np.all(np.isnan(values)):
                ax.plot(epochs, values, marker="o" if len(values) < 30 else None, markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.95, wspace=0.25)
    return _save(fig, path, dpi, metadata)
