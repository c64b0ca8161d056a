"""Samples/s of the NumPy Loader and of streamnn.torch under torch's DataLoader, interleaved in one run.

    python tools/bench_torch.py                       # 25,000 rows of 64x64x3 uint8, 5 rounds
    python tools/bench_torch.py --rows 5000 --repeats 3 --workers 0,1,2

Writes a uint8 store of random pixels in a temporary directory (deleted at the end), page cache
warm, and times shuffled epochs (batch 64) of each method, one epoch of each method per round,
over --repeats rounds (so a change of the machine's load hits every method alike); prints the
medians, their ratio to the NumPy loader, and the load average before and after:

  loader-reuse   Loader(reuse_buffers=True): the ring of buffers (what the trainer needs)
  loader-safe    Loader() default: buffers reused only once nothing references them
  loader-keep    Loader() default, the caller keeping every batch (fresh buffers: the cost of keeping)
  torch-wN       StoreBatches(...).dataloader(num_workers=N): NCHW RGB float32 tensors, fresh each
                 batch (N > 0: persistent workers, batches handed over through the shared ring)
  uint8-wN       as torch-wN with dtype=torch.uint8 (NCHW RGB bytes, to normalize on the device; --uint8)
  nhwc-wN        as torch-wN with layout="NHWC", channels="BGR": the rows as stored, not turned (--nhwc)
  plain-wN       DataLoader(StoreBatches(...), batch_size=None, num_workers=N): a fresh shared tensor
                 per batch (--plain)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

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


def loader_epoch(path: str, reuse: bool, keep: bool) -> Callable[[], int]:
    loader = Loader(path, "train", batch_size=64, seed=0, reuse_buffers=reuse)

    def run() -> int:
        kept, n = [], 0
        for X, _ in loader:
            n += X.shape[1]
            if keep:
                kept.append(X)
        return n
    return run


def torch_epoch(path: str, workers: int, plain: bool, **kwargs: str) -> Callable[[], int]:
    from torch.utils.data import DataLoader
    from streamnn.torch import StoreBatches
    ds = StoreBatches(path, "train", batch_size=64, seed=0, **kwargs)
    dl = DataLoader(ds, batch_size=None, num_workers=workers) if plain else ds.dataloader(num_workers=workers)
    epoch = [0]

    def run() -> int:
        ds.set_epoch(epoch[0])
        epoch[0] += 1
        return sum(len(x) for x, _ in dl)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=25_000)
    ap.add_argument("--repeats", type=int, default=5, help="rounds (epochs of each method)")
    ap.add_argument("--workers", default="0,2", help="DataLoader workers to time, comma-separated")
    ap.add_argument("--plain", action="store_true", help="also a plain DataLoader over StoreBatches")
    ap.add_argument("--uint8", action="store_true", help="also uint8 batches")
    ap.add_argument("--nhwc", action="store_true", help="also NHWC BGR batches")
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.h5")
        make(path, a.rows, (64, 64, 3))
        methods = {name: loader_epoch(path, reuse, keep) for name, reuse, keep in
                   (("loader-reuse", True, False), ("loader-safe", False, False), ("loader-keep", False, True))}
        if not a.no_torch:
            for w in (int(x) for x in a.workers.split(",")):
                methods[f"torch-w{w}"] = torch_epoch(path, w, plain=False)
                if a.uint8:
                    methods[f"uint8-w{w}"] = torch_epoch(path, w, plain=False, dtype="uint8")
                if a.nhwc:
                    methods[f"nhwc-w{w}"] = torch_epoch(path, w, plain=False, layout="NHWC", channels="BGR")
                if a.plain and w:
                    methods[f"plain-w{w}"] = torch_epoch(path, w, plain=True)
        load0 = os.getloadavg()
        for run in methods.values():
            run()  # warm: page cache, maps, persistent workers
        rates: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(a.repeats):
            for name, run in methods.items():
                t = time.perf_counter()
                n = run()
                rates[name].append(n / (time.perf_counter() - t))
        load1 = os.getloadavg()
        base = statistics.median(rates["loader-reuse"])
        print(f"{a.rows} rows of 64x64x3 uint8, batch 64, page cache warm, median of {a.repeats} interleaved rounds")
        print(f"load average {load0[0]:.1f} before, {load1[0]:.1f} after ({os.cpu_count()} cores)")
        print(f"{'method':<14} {'samples/s':>10} {'vs reuse':>9} {'min..max':>16}")
        for name, v in rates.items():
            m = statistics.median(v)
            print(f"{name:<14} {m:>10.0f} {m / base:>8.2f}x {min(v):>7.0f}..{max(v):<7.0f}")


if __name__ == "__main__":
    main()
