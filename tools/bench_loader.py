"""Benchmark the streamnn loader against its bound and the usual alternatives.

    python tools/bench_loader.py                  # 25,000 rows of 64x64x3: a 1.2 GB float32 store + uint8
    python tools/bench_loader.py --rows 5000 --repeats 2 --no-torch     # quick look
    python tools/bench_loader.py --bound --rows 200000 --dtypes uint8   # the loader / its bound, one process

``--bound``: the loader against the in-memory gather of the same permutation, in one process,
interleaved (see :func:`measure_bound`): the ratio that says whether the loader is at its bound.

Generates stores of random pixels with StoreWriter in a temporary directory (deleted at the
end), then measures each method in a fresh subprocess (so peak memory is that method's own):

  loader-exact    streamnn Loader, exact shuffle (default), prefetch 2
  loader-exact-p0 the same without the prefetch thread
  loader-block    streamnn Loader, order="block"
  memory          the same exact permutation gathered from the split held in a NumPy array
                  (np.take into a reused buffer + normalize): the bound, ratios are to it
  h5py-rows       one h5py read per row (on a subset of rows, extrapolated)
  torch-w0/w2     torch DataLoader(shuffle=True, batch_size=64) over a map-style dataset that
                  reads one row per item from h5py, num_workers 0 and 2 (skipped without torch)
  train-*         an epoch of a matmul "training step" fed by the loader vs by the in-memory
                  gather: tanh(W @ X) with W (64, D), a step of the same order of cost as
                  loading the batch, to show whether loading overlaps with BLAS

samples/s is the median over --repeats epochs (the first epoch of a fresh memory map
includes its page faults). Peak private memory is RssAnon (anonymous pages: the process's
own memory; page-cache pages of a mapped file are not counted), sampled every 2 ms, with
the children of torch's workers added. The page cache is warm (the store was just
written). BLAS runs --blas-threads threads (default 1: on 2 cores, one core for BLAS and
one for the loader's thread; 2 BLAS threads on a busy 2-core machine spin and slow
everything down).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bound import Gather, load_split, measure_bound  # noqa: E402

METHODS = ["memory", "loader-exact", "loader-exact-p0", "loader-block", "h5py-rows", "torch-w0", "torch-w2",
           "train-memory", "train-stream", "train-stream-p0"]
BATCH = 64


# -- memory sampling -----------------------------------------------------------------------------------
def _rss_anon_kb(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children() -> list[str]:
    kids: list[str] = []
    for path in glob.glob("/proc/self/task/*/children"):
        try:
            with open(path) as f:
                kids += f.read().split()
        except OSError:
            pass
    return kids


class PeakRss:
    """Samples this process's RssAnon (plus its children's) in a thread; ``peak_mb``."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = _rss_anon_kb() + sum(_rss_anon_kb(k) for k in _children())
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 1024


# -- the measured methods (run inside a worker subprocess) ------------------------------------------------
def _perm(n: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([0, epoch])).permutation(n)


def _step_fn(d: int):
    W = np.random.default_rng(0).standard_normal((64, d)).astype(np.float32) * 0.01

    def step(X: np.ndarray) -> None:
        np.tanh(W @ X)
    return step


def worker(method: str, store: str, repeats: int, subset_rows: int) -> dict:
    import h5py

    from streamnn import open_store
    from streamnn.data.loader import Loader

    with open_store(store) as s:
        n, d, scale = s.n_rows("train"), s.n_features, s.scale
        stored = s.dataset("train").dtype
    times: list[float] = []
    counted = n
    extra: dict = {}
    with PeakRss() as rss:
        if method.startswith("loader") or method.startswith("train-stream"):
            order = "block" if method == "loader-block" else "exact"
            prefetch = 0 if method.endswith("-p0") else 2
            step = _step_fn(d) if method.startswith("train") else None
            with Loader(store, "train", BATCH, seed=0, order=order, prefetch=prefetch) as L:
                for _ in range(repeats):
                    t = time.perf_counter()
                    for X, _y in L:
                        if step is not None:
                            step(X)
                    times.append(time.perf_counter() - t)
                extra["reader"] = L.reader_mode
                extra["threaded"] = L.threaded
                extra["in_thread"] = L.batches_threaded / max(1, L.batches_threaded + L.batches_inline)
        elif method in ("memory", "train-memory"):
            data = load_split(store)
            gather = Gather(data, scale)
            step = _step_fn(d) if method == "train-memory" else None
            for epoch in range(repeats):
                perm = _perm(n, epoch)
                t = time.perf_counter()
                for i in range(0, n, BATCH):
                    out = gather(perm[i:i + BATCH])
                    if step is not None:
                        step(out.T)
                times.append(time.perf_counter() - t)
        elif method == "h5py-rows":
            counted = min(n, subset_rows)
            buf = np.empty((BATCH, d), np.float32)
            with h5py.File(store, "r") as f:
                dset = f["train/X"]
                for epoch in range(repeats):
                    perm = _perm(n, epoch)[:counted]
                    t = time.perf_counter()
                    for i in range(0, counted, BATCH):
                        for j, r in enumerate(perm[i:i + BATCH]):
                            buf[j] = dset[r]
                        if scale != 1.0:
                            buf *= np.float32(scale)
                    times.append(time.perf_counter() - t)
        elif method.startswith("torch"):
            import torch
            from torch.utils.data import DataLoader, Dataset

            torch.set_num_threads(1)

            class Rows(Dataset):
                def __init__(self) -> None:
                    self.f = None
                    with h5py.File(store, "r") as f:
                        self.y = f["train/y"][...].astype(np.int64)

                def __len__(self) -> int:
                    return n

                def __getitem__(self, i: int):
                    if self.f is None:  # opened lazily in each worker process
                        self.f = h5py.File(store, "r")
                        self.x = self.f["train/X"]
                    row = self.x[i].astype(np.float32)
                    if scale != 1.0:
                        row *= np.float32(scale)
                    return torch.from_numpy(row), int(self.y[i])

            workers = int(method[-1])
            dl = DataLoader(Rows(), batch_size=BATCH, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(0))
            for _ in range(repeats):
                t = time.perf_counter()
                for xb, _yb in dl:
                    xb.T  # (D, B) view, as the models take it
                times.append(time.perf_counter() - t)
        else:
            raise SystemExit(f"unknown method {method}")
    rates = [counted / t for t in times]
    return {"method": method, "samples_per_s": statistics.median(rates), "rates": rates,
            "epoch_s": statistics.median(times) * n / counted, "peak_rss_anon_mb": rss.peak_mb, **extra}


# -- driver -------------------------------------------------------------------------------------------------
def make_store(path: str, rows: int, dtype: str = "uint8", compression: str | None = None,
               shape: tuple[int, int, int] = (64, 64, 3), command: str = "bench_loader") -> None:
    """A store of ``rows`` random images (also used by the other benchmarks)."""
    from streamnn import StoreWriter

    rng = np.random.default_rng(0)
    with StoreWriter(path, class_names=["cats", "dogs"], image_shape=shape, dtype=dtype,
                     compression=compression, command=command) as w:
        w.add_split("train", rows)
        for i in range(0, rows, 1000):
            m = min(1000, rows - i)
            w.write_rows("train", rng.integers(0, 256, (m, *shape), dtype=np.uint8), rng.integers(0, 2, m),
                         [f"img/{j}.jpg" for j in range(i, i + m)])
        w.commit()


def run_worker(method: str, store: str, args: argparse.Namespace) -> dict | None:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.blas_threads), OMP_NUM_THREADS=str(args.blas_threads),
               MKL_NUM_THREADS=str(args.blas_threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--store", store,
           "--repeats", str(args.repeats), "--subset-rows", str(args.subset_rows)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  {method}: failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=25000, help="rows of 64x64x3 (25,000 float32 = 1.2 GB)")
    ap.add_argument("--dtypes", default="float32,uint8")
    ap.add_argument("--repeats", type=int, default=5, help="epochs per method (median)")
    ap.add_argument("--lzf-rows", type=int, default=5000,
                    help="rows of an extra lzf-compressed float32 store (0: skip), loader only")
    ap.add_argument("--subset-rows", type=int, default=2000, help="rows read by h5py-rows (extrapolated)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--blas-threads", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where to write the temporary stores")
    ap.add_argument("--bound", action="store_true",
                    help="only the loader against the in-memory gather, interleaved in one process")
    ap.add_argument("--store", help="with --bound: an existing store (its train split) instead of a new one")
    ap.add_argument("--batch", type=int, default=BATCH, help="with --bound: the batch size")
    ap.add_argument("--rounds", type=int, default=40, help="with --bound: rounds of interleaved segments")
    ap.add_argument("--segment", type=int, default=100, help="with --bound: batches per method and round")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.store, args.repeats, args.subset_rows)))
        return
    if args.bound:
        print(f"cores {os.cpu_count()}, numpy {np.__version__}, BLAS threads {args.blas_threads}")
        with tempfile.TemporaryDirectory(prefix="bench_loader_", dir=args.dir) as tmp:
            for dtype in [None] if args.store else args.dtypes.split(","):
                path = args.store or os.path.join(tmp, f"bench_{dtype}.h5")
                if dtype:
                    make_store(path, args.rows, dtype)
                print(f"\n== {path}: {os.path.getsize(path) / 1e9:.2f} GB ==")
                measure_bound(path, args.batch, args.rounds, args.segment)
        return

    methods = [m for m in args.methods.split(",") if m]
    try:
        import torch  # noqa: F401
        has_torch = not args.no_torch
    except ImportError:
        has_torch = False
        print("torch is not installed: skipping the torch DataLoader rows "
              "(pip install torch==2.13.0 installs the local CPU wheel)")
    if not has_torch:
        methods = [m for m in methods if not m.startswith("torch")]
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at start, numpy {np.__version__}, "
          f"BLAS threads {args.blas_threads}, batch {BATCH}, {args.repeats} epochs per method (median)")
    with tempfile.TemporaryDirectory(prefix="bench_loader_", dir=args.dir) as tmp:
        cases = [(dtype, None, args.rows, methods) for dtype in args.dtypes.split(",")]
        if args.lzf_rows:
            cases.append(("float32", "lzf", args.lzf_rows,
                          [m for m in methods if m in ("memory", "loader-exact", "loader-block")]))
        for dtype, compression, rows, case_methods in cases:
            path = os.path.join(tmp, f"bench_{dtype}_{compression}.h5")
            t = time.perf_counter()
            make_store(path, rows, dtype, compression)
            size = os.path.getsize(path) / 1e9
            print(f"\n== {dtype}{', ' + compression + '-compressed' if compression else ''}: {rows} rows of "
                  f"64x64x3, {size:.2f} GB store (written in {time.perf_counter() - t:.0f} s) ==")
            results = {}
            for m in case_methods:
                r = run_worker(m, path, args)
                if r is not None:
                    results[m] = r
            bound = results.get("memory", {}).get("samples_per_s")
            print(f"{'method':<17}{'samples/s':>11}{'x memory':>10}{'peak RssAnon MB':>17}  notes")
            for m, r in results.items():
                if m.startswith("train"):
                    continue
                ratio = f"{r['samples_per_s'] / bound:.2f}" if bound else "-"
                notes = []
                if "reader" in r:
                    notes.append(f"reader={r['reader']}, {100 * r['in_thread']:.0f}% of batches from the thread")
                if m == "h5py-rows":
                    notes.append(f"{args.subset_rows} rows, epoch extrapolated to {r['epoch_s']:.1f} s")
                notes.append("runs: " + " ".join(f"{x:.0f}" for x in r["rates"]))
                print(f"{m:<17}{r['samples_per_s']:>11.0f}{ratio:>10}{r['peak_rss_anon_mb']:>17.0f}  "
                      + "; ".join(notes))
            base = results.get("train-memory")
            if base:
                print("matmul epoch (tanh(W @ X), W (64, D), per batch):")
                for m in ("train-memory", "train-stream", "train-stream-p0"):
                    if m in results:
                        r = results[m]
                        note = (f", {100 * r['in_thread']:.0f}% of batches from the thread"
                                if "in_thread" in r else "")
                        note += "; runs (s): " + " ".join(f"{rows / x:.2f}" for x in r["rates"])
                        print(f"  {m:<16} {r['epoch_s']:6.2f} s/epoch  "
                              f"x{r['epoch_s'] / base['epoch_s']:.2f} of in-memory"
                              f"  peak RssAnon {r['peak_rss_anon_mb']:.0f} MB{note}")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (2 cores; other work on the machine skews timings)")


if __name__ == "__main__":
    main()
