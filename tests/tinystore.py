"""A tiny store (4x4x3 images, 12 train and 6 test rows, stats, one skipped file) for tests of bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from streamnn import StoreWriter

SHAPE = (4, 4, 3)
D = 48


def make_store(path: Path, dtype: str = "uint8", n_train: int = 12, n_test: int = 6) -> Path:
    rng = np.random.default_rng(0)
    with StoreWriter(path, class_names=["cats", "dogs"], image_shape=SHAPE, dtype=dtype) as w:
        for split, n in (("train", n_train), ("test", n_test)):
            y = np.arange(n) % 2
            px = rng.integers(0, 255, (n, *SHAPE)).astype(np.uint8)
            w.add_split(split, n)
            w.write_rows(split, px, y, [f"{split}/{i}.jpg" for i in range(n)])
        w.set_stats(np.full(D, 0.5), np.full(D, 0.2))
        w.set_skipped([("bad.jpg", "not an image")])
        w.commit()
    return path
