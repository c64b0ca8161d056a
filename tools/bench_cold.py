"""First epoch from a cold page cache: what the loader does when the store is not in memory.

    sudo python tools/bench_cold.py                  # 25,000 rows of 64x64x3 float32 (1.2 GB)
    sudo python tools/bench_cold.py --rows 5000 --repeats 2     # quick look

A store larger than RAM is read from disk on every epoch; a warm page cache (what
``tools/bench_loader.py`` measures) hides that. Before every timed epoch this drops the
page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``: root only, Linux only) and opens
the store afresh, then measures, in one process:

  sequential    the split read front to back with ``read_direct`` into a reused 64 MB buffer:
                the disk's streaming rate, the bound (ratios are to it) and what loading the
                split into memory would cost, were it to fit
  loader-exact  one epoch of the streamnn Loader, exact shuffle (the default; a store this
                small is memory-mapped)
  loader-block  one epoch with ``order="block"`` (blocks of rows, then rows in a window)
  pread-exact   the exact shuffle with ``reader="pread"`` (what a store bigger than RAM gets;
                ``tools/bench_bigstore.py`` measures that case itself)

Samples/s and MB/s are medians over --repeats cold epochs. On a virtual machine the host
may cache the disk image: "cold" then means cold for this machine's kernel only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import make_store  # noqa: E402

DROP = "/proc/sys/vm/drop_caches"
BATCH = 64


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    with open(DROP, "w") as f:
        f.write("3\n")


def sequential(path: str) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        dset = f["train/X"]
        n, d = dset.shape
        rows = max(1, (64 << 20) // (d * dset.dtype.itemsize))
        buf = np.empty((rows, d), dset.dtype)
        for i in range(0, n, rows):
            m = min(rows, n - i)
            dset.read_direct(buf, np.s_[i:i + m], np.s_[:m])
    return n


def loader_epoch(order: str, reader: str = "auto") -> Callable[[str], int]:
    def run(path: str) -> int:
        from streamnn.data.loader import Loader

        n = 0
        with Loader(path, "train", BATCH, seed=0, order=order, reader=reader) as L:
            for X, _ in L:
                n += X.shape[1]
        return n
    return run


METHODS: dict[str, Callable[[str], int]] = {
    "sequential": sequential, "loader-exact": loader_epoch("exact"), "loader-block": loader_epoch("block"),
    "pread-exact": loader_epoch("exact", "pread"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=25000, help="rows of 64x64x3")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3, help="cold epochs per method (median)")
    ap.add_argument("--dir", default=None, help="where to write the temporary store (the disk measured)")
    args = ap.parse_args()
    if not os.access(DROP, os.W_OK):
        raise SystemExit(f"{DROP} is not writable: dropping the page cache needs root on Linux")
    with tempfile.TemporaryDirectory(prefix="bench_cold_", dir=args.dir) as tmp:
        path = os.path.join(tmp, "cold.h5")
        make_store(path, args.rows, args.dtype)
        size = os.path.getsize(path)
        row_bytes = size / args.rows
        print(f"{args.rows} rows of 64x64x3 {args.dtype} ({size / 1e9:.2f} GB, {row_bytes / 1024:.0f} KB a row) "
              f"in {tmp}; page cache dropped before each of {args.repeats} epochs per method; "
              f"load average {os.getloadavg()[0]:.1f}")
        rates: dict[str, list[float]] = {m: [] for m in METHODS}
        for _ in range(args.repeats):  # interleaved, so that drift hits every method alike
            for name, run in METHODS.items():
                drop_page_cache()
                t = time.perf_counter()
                n = run(path)
                rates[name].append(n / (time.perf_counter() - t))
        bound = statistics.median(rates["sequential"])
        print(f"{'method':<14}{'samples/s':>11}{'MB/s':>8}{'x sequential':>14}  runs")
        for name, r in rates.items():
            med = statistics.median(r)
            print(f"{name:<14}{med:>11.0f}{med * row_bytes / 1e6:>8.0f}{med / bound:>14.2f}  "
                  + " ".join(f"{x:.0f}" for x in r))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
