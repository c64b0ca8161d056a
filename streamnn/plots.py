"""Figures saved to image files, headless (matplotlib's Agg canvas, no pyplot state).

Each function builds its own :class:`~matplotlib.figure.Figure`, draws, and saves it
atomically (temporary file, then rename), so nothing depends on a display or on global
figure state. Images come in OpenCV's channel order (BGR) and are converted to RGB here.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .atomic import atomic_output


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_output(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path


def save_image_grid(images: np.ndarray | Sequence[np.ndarray], titles: Sequence[str] | None,
                    path: str | os.PathLike, *, channel_order: str = "BGR", ncols: int | None = None,
                    title: str | None = None, cell_inches: float = 1.3, dpi: int = 100) -> Path:
    """Save uint8 images (N, H, W, C) with C = 3 (``channel_order`` "BGR" or "RGB") or 1 (gray)
    as a grid, each captioned by its title. Returns the path written."""
    images = [np.asarray(im) for im in images]
    if not images:
        raise ValueError("no images to plot")
    titles = list(titles) if titles is not None else [""] * len(images)
    n = len(images)
    ncols = ncols or min(n, max(1, math.ceil(math.sqrt(n * 4 / 3))))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(ncols * cell_inches, nrows * cell_inches + (0.4 if title else 0.0)), layout="constrained")
    for i, (im, caption) in enumerate(zip(images, titles)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        if im.ndim == 3 and im.shape[2] == 1:
            im = im[:, :, 0]
        if im.ndim == 2:
            ax.imshow(im, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(im[:, :, ::-1] if channel_order.upper() == "BGR" else im, interpolation="nearest")
        ax.set_title(caption, fontsize=8, pad=2)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)
