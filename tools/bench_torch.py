"""Samples/s of the NumPy Loader (safe batches vs reuse_buffers) and of streamnn.torch under DataLoader.

    python tools/bench_torch.py                       # 25,000 rows of 64x64x3 uint8, 3 epochs each
    python tools/bench_torch.py --rows 5000 --repeats 2

Writes a uint8 store of random pixels in a temporary directory (deleted at the end), page cache
warm, and times a shuffled epoch (batch 64) for each method; the median over --repeats epochs:

  loader-reuse   Loader(reuse_buffers=True): the ring of buffers (what the trainer needs)
  loader-safe    Loader() default: buffers reused only once nothing references them
  loader-keep    Loader() default, the caller keeping every batch (fresh buffers: the cost of keeping)
  torch-wN       StoreBatches(...).dataloader(num_workers=N): NCHW RGB float32 tensors
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from streamnn import StoreWriter  # noqa: E402
from streamnn.data.loader import Loader  # noqa: E402


def make(path: str, rows: int, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    with StoreWriter(path, class_names=["a", "b"], image_shape=shape, dtype="uint8") as w:
        w.add_split("train", rows)
        for i in range(0, rows, 2000):
            n = min(2000, rows - i)
            w.write_rows("train", rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 2, n),
                         [f"{j}" for j in range(i, i + n)])
        w.commit()


def timed(epoch_fn, repeats: int) -> float:
    times = []
    for e in range(repeats):
        t = time.perf_counter()
        n = epoch_fn(e)
        times.append(n / (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=25_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.h5")
        make(path, a.rows, (64, 64, 3))
        results = {}

        def loader_epoch(reuse: bool, keep: bool):
            loader = Loader(path, "train", batch_size=64, seed=0, reuse_buffers=reuse)

            def run(e: int) -> int:
                kept, n = [], 0
                for X, _ in loader:
                    n += X.shape[1]
                    if keep:
                        kept.append(X)
                return n
            return run

        for name, reuse, keep in (("loader-reuse", True, False), ("loader-safe", False, False),
                                  ("loader-keep", False, True)):
            timed(loader_epoch(reuse, keep), 1)  # warm: page cache and map
            results[name] = timed(loader_epoch(reuse, keep), a.repeats)
        if not a.no_torch:
            from streamnn.torch import StoreBatches
            for w in (int(x) for x in a.workers.split(",")):
                ds = StoreBatches(path, "train", batch_size=64, seed=0)
                dl = ds.dataloader(num_workers=w)

                def run(e: int) -> int:
                    return sum(len(x) for x, _ in dl)
                results[f"torch-w{w}"] = timed(run, a.repeats)
        base = results["loader-reuse"]
        print(f"{a.rows} rows of 64x64x3 uint8, batch 64, median of {a.repeats} epochs (page cache warm)")
        print(f"{'method':<14} {'samples/s':>10} {'vs reuse':>9}")
        for name, v in results.items():
            print(f"{name:<14} {v:>10.0f} {v / base:>8.2f}x")


if __name__ == "__main__":
    main()
