"""The cost of random erasing: batches of 64 with flips + shifts + erase against flips + shifts alone.

    python tools/bench_erase.py                       # 32x32 and 64x64, 2048 rows each
    python tools/bench_erase.py --sizes 32 --repeats 9 --rows 1024

Two measures per image size, each run interleaved (baseline, contender, baseline, ...) and the
median over --repeats taken:

  augment   the augmentation of one (64, H, W, 3) float32 batch in memory as the loader does it:
            the draws, flip_images, shift_images (4 px, reflect) [+ the erase draws, erase_images]
  erase     the erase step alone (its draws and erase_images) on such a batch, against the
            flips and shifts (augment's baseline)
  loader    an epoch of Loader batches (standardized, prefetch 0) from a uint8 store of random
            pixels written to a temporary directory (deleted at the end): augment "flip,shift"
            against "flip,shift,erase"

Prints microseconds per batch, the ratio contender / baseline and the machine load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from streamnn import StoreWriter
from streamnn.data.loader import Loader
from streamnn.data.transforms import Augment, erase_images, flip_images, shift_images

BATCH = 64


def augment_batch(aug: Augment, imgs: np.ndarray, k: int, scratch: tuple[np.ndarray, np.ndarray]) -> None:
    """Batch k augmented in place as :meth:`streamnn.data.epoch.BatchMaker.produce` does (no standardization)."""
    b = len(imgs)
    flip_images(imgs, aug.flips(0, 0, k, b), scratch[0])
    shift_images(imgs, aug.shifts(0, 0, k, b), aug.shift, aug.padding, scratch[1])
    if aug.erase:
        erase_images(imgs, aug.erasures(0, 0, k, b, imgs.shape[1:]))


def time_augment(aug: Augment, batch: np.ndarray, count: int) -> float:
    """Seconds per batch over ``count`` batches."""
    b, h, w, c = batch.shape
    scratch = (np.empty_like(batch), np.empty((b, h + 2 * aug.shift, w + 2 * aug.shift, c), np.float32))
    imgs = batch.copy()
    t = time.perf_counter()
    for k in range(count):
        imgs[:] = batch
        augment_batch(aug, imgs, k, scratch)
    return (time.perf_counter() - t) / count


def time_erase(aug: Augment, batch: np.ndarray, count: int) -> float:
    """Seconds per batch of the erase step alone over ``count`` batches."""
    imgs = batch.copy()
    t = time.perf_counter()
    for k in range(count):
        erase_images(imgs, aug.erasures(0, 0, k, len(imgs), imgs.shape[1:]))
    return (time.perf_counter() - t) / count


def time_loader(store: Path, augment: str) -> float:
    """Seconds per batch of an epoch of the loader."""
    with Loader(store, "train", BATCH, seed=1, augment=augment, standardize=True, prefetch=0) as loader:
        t = time.perf_counter()
        n = sum(1 for _ in loader)
        return (time.perf_counter() - t) / n


def write_store(path: Path, size: int, rows: int) -> Path:
    rng = np.random.default_rng(0)
    shape = (size, size, 3)
    px = rng.integers(0, 256, (rows, *shape), dtype=np.uint8)
    with StoreWriter(path, class_names=["a", "b"], image_shape=shape, dtype="uint8") as w:
        w.add_split("train", rows)
        w.write_rows("train", px, rng.integers(0, 2, rows), [f"p/{i}" for i in range(rows)])
        flat = px.reshape(rows, -1) / 255.0
        w.set_stats(flat.mean(0), flat.std(0))
        w.commit()
    return path


def interleaved(measure, repeats: int) -> tuple[float, float]:
    """Medians (baseline, contender) of ``measure(contender: bool)``, alternating."""
    base, cont = [], []
    for _ in range(repeats):
        base.append(measure(False))
        cont.append(measure(True))
    return statistics.median(base), statistics.median(cont)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,64", help="image sizes (square), comma-separated")
    ap.add_argument("--rows", type=int, default=2048, help="rows of the loader's store")
    ap.add_argument("--batches", type=int, default=200, help="batches per augment measure")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    plain, erase = Augment.parse("flip,shift=4/reflect"), Augment.parse("flip,shift=4/reflect,erase=0.5")
    print(f"load before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'measure':<10} {'size':>5} {'flip+shift us':>14} {'+erase us':>10} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            batch = np.random.default_rng(1).random((BATCH, size, size, 3), dtype=np.float32)
            b, c = interleaved(lambda e: time_augment(erase if e else plain, batch, args.batches), args.repeats)
            print(f"{'augment':<10} {size:>5} {b * 1e6:>14.1f} {c * 1e6:>10.1f} {c / b:>6.3f}")
            e = statistics.median(time_erase(erase, batch, args.batches) for _ in range(args.repeats))
            print(f"{'erase':<10} {size:>5} {b * 1e6:>14.1f} {e * 1e6:>10.1f} {e / b:>6.3f}")
            store = write_store(Path(tmp) / f"s{size}.h5", size, args.rows)
            b, c = interleaved(lambda e: time_loader(store, erase.spec if e else plain.spec), args.repeats)
            print(f"{'loader':<10} {size:>5} {b * 1e6:>14.1f} {c * 1e6:>10.1f} {c / b:>6.3f}")
    print(f"load after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
