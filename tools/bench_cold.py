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

    python tools/bench_cold.py --bytes                  # bytes read per byte needed; no root needed
    python tools/bench_cold.py --bytes --shapes 64x64x3,6x8x3 --dtype uint8,float32

``--bytes``: read amplification of a cold exact-shuffle epoch with ``reader="pread"`` (what a
store bigger than RAM gets), for the store as streamnn writes it (X page-aligned) and for a copy
in HDF5's default layout (as streamnn 0.1.0 wrote it: X wherever HDF5 put it). The file's pages
are dropped from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``, no root needed) before
the epoch, and the pages of each batch's rows once it is delivered (a page shared with a
neighbouring row included), as the page cache of a store far bigger than RAM evicts them, so a
row finds no page that an earlier row brought in. Columns: ``read/asked``, bytes read from
storage (this process's ``read_bytes`` in ``/proc/self/io``) over the bytes the reader's reads
asked for (the layout's cost); ``model``, the same from the geometry alone (the pages each row
touches, for isolated rows); ``read/epoch``, bytes read over the rows delivered (adds the metadata
read at open and the read-ahead into the next epoch, up to 2,048 rows: small in a big store).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def read_bytes() -> int:
    """Bytes this process has had read from storage (``/proc/self/io``)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def drop_file(fd: int) -> None:
    """Drop a file's (clean) pages from the page cache."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def old_layout(src: str, dst: str) -> int:
    """A copy of the store ``src`` in HDF5's default layout (no alignment), as streamnn 0.1.0 wrote
    stores, with X off the page grid: HDF5 allocates in 2 KiB metadata blocks, so a store of 0.1.0
    had its X on a page about half the time (its test fixtures: at bytes 10,616 and 12,072); a
    filler attribute moves X when it lands on one. Returns X's offset (train split)."""
    import h5py

    for filler in range(0, 8192, 1000):
        with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
            for key, value in f.attrs.items():
                if key != "x_alignment":
                    g.attrs[key] = value
            g.attrs["bench_filler"] = "x" * filler
            for name, group in f.items():
                out = g.create_group(name)
                for key, dset in group.items():
                    copy = out.create_dataset(key, shape=dset.shape, dtype=dset.dtype)
                    step = max(1, (64 << 20) // max(1, dset.dtype.itemsize * int(np.prod(dset.shape[1:]))))
                    for i in range(0, dset.shape[0], step):
                        copy[i:i + step] = dset[i:i + step]
            g.flush()
            os.fsync(g.id.get_vfd_handle())
            offset = int(g["train/X"].id.get_offset())
        if offset % 4096:
            return offset
    raise SystemExit("could not place X off the page grid")


def pages_model(offset: int, rows: int, row_bytes: int, page: int = 4096) -> float:
    """Bytes of the pages each row touches, over the bytes of the rows (no page shared)."""
    start = offset + np.arange(rows, dtype=np.int64) * row_bytes
    pages = (start + row_bytes - 1) // page - start // page + 1
    return float(pages.sum() * page / (rows * row_bytes))


class Asked:
    """``os.preadv`` wrapped, inside the ``with``, to count the bytes the reader's reads return."""

    def __init__(self) -> None:
        self.total, self._lock, self._real = 0, threading.Lock(), os.preadv

    def preadv(self, fd: int, buffers: Any, offset: int, *flags: int) -> int:
        got = self._real(fd, buffers, offset, *flags)
        with self._lock:
            self.total += got
        return got

    def __enter__(self) -> Asked:
        os.preadv = self.preadv
        return self

    def __exit__(self, *exc: object) -> None:
        os.preadv = self._real


def cold_bytes(path: str, offset: int, row_bytes: int, page: int = 4096) -> tuple[int, int, int, float]:
    """One exact-shuffle epoch with ``pread`` from a cold page cache, the pages of every batch's rows
    dropped once it is delivered (whole pages, a page shared with a neighbouring row included):
    (rows delivered, bytes asked for by the reader's reads, bytes read from storage, seconds).
    The reader reads ahead into the next epoch: asked counts those reads too, delivered does not."""
    from streamnn.data.loader import Loader

    fd = os.open(path, os.O_RDONLY)
    try:
        with Asked() as asked, Loader(path, "train", BATCH, seed=0, reader="pread") as L:
            drop_file(fd)
            before, t, n = read_bytes(), time.perf_counter(), 0
            for X, _ in L:
                n += X.shape[1]
                for row in L.batch_rows(L.epoch, L.position - 1).tolist():
                    lo = (offset + row * row_bytes) // page * page
                    hi = -(-(offset + (row + 1) * row_bytes) // page) * page
                    os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            L.close()  # waits for the reads under way
            return n, asked.total, read_bytes() - before, time.perf_counter() - t
    finally:
        os.close(fd)


def measure_bytes(args: argparse.Namespace) -> None:
    import h5py

    print(f"{args.rows} rows a store, one exact-shuffle epoch with reader='pread', batches of {BATCH}, the "
          f"pages of delivered rows dropped; load average {os.getloadavg()[0]:.1f}")
    print(f"{'store':<19}{'layout':<22}{'X at':>7}{'read/asked':>12}{'model':>7}{'read/epoch':>12}{'MB/s':>6}"
          f"  runs (read/asked)")
    with tempfile.TemporaryDirectory(prefix="bench_cold_", dir=args.dir) as tmp:
        for shape in args.shapes.split(","):
            hwc = tuple(int(v) for v in shape.split("x"))
            for dtype in args.dtype.split(","):
                new, old = os.path.join(tmp, "new.h5"), os.path.join(tmp, "old.h5")
                make_store(new, args.rows, dtype, shape=hwc)
                old_layout(new, old)
                for name, path in (("page-aligned (new)", new), ("HDF5 default (0.1.0)", old)):
                    with h5py.File(path, "r") as f:
                        dset = f["train/X"]
                        offset, row_bytes = int(dset.id.get_offset()), dset.shape[1] * dset.dtype.itemsize
                    runs = [cold_bytes(path, offset, row_bytes) for _ in range(args.repeats)]
                    layout = [read / asked for _, asked, read, _ in runs]
                    epoch = statistics.median(read / (n * row_bytes) for n, _, read, _ in runs)
                    rate = statistics.median(asked / s / 1e6 for _, asked, _, s in runs)
                    print(f"{shape + ' ' + dtype:<19}{name:<22}{offset:>7}{statistics.median(layout):>12.3f}"
                          f"{pages_model(offset, args.rows, row_bytes):>7.3f}{epoch:>12.3f}{rate:>6.0f}  "
                          + " ".join(f"{r:.3f}" for r in layout))
                os.remove(new)
                os.remove(old)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


METHODS: dict[str, Callable[[str], int]] = {
    "sequential": sequential, "loader-exact": loader_epoch("exact"), "loader-block": loader_epoch("block"),
    "pread-exact": loader_epoch("exact", "pread"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=25000, help="rows of 64x64x3")
    ap.add_argument("--dtype", default="float32", help="stored dtype (with --bytes: a comma-separated list)")
    ap.add_argument("--repeats", type=int, default=3, help="cold epochs per method (median)")
    ap.add_argument("--dir", default=None, help="where to write the temporary store (the disk measured)")
    ap.add_argument("--bytes", action="store_true", help="measure bytes read per byte needed (no root needed)")
    ap.add_argument("--shapes", default="64x64x3", help="with --bytes: image shapes HxWxC, comma-separated")
    args = ap.parse_args()
    if args.bytes:
        measure_bytes(args)
        return
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
