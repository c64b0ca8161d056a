"""A store bigger than RAM, from a cold page cache: the loader's readers against the disk itself.

    sudo python tools/bench_bigstore.py                        # float32 store of ~1.25x RAM (+ uint8 of the same rows)
    sudo python tools/bench_bigstore.py --gib 3 --seconds 10   # quick look (fits in RAM: the readers are forced)

Writes a store of 64x64x3 rows (random pixels, generated chunk by chunk with StoreWriter; its
size defaults to 1.25x the machine's RAM, which is checked against the free disk first) in
--dir (default: the system temporary folder), deletes it at the end, and measures each method
in a fresh subprocess (so that peak RSS, VmHWM, is that method's own), after dropping the page
cache (``sync; echo 3 > /proc/sys/vm/drop_caches``: root only; without root the figures are
said not to be cold). A method runs one epoch or --seconds, whichever ends first:

  disk-1/4/16     whole-row ``os.preadv`` at random rows of X with 1 / 4 / 16 threads,
                  ``POSIX_FADV_RANDOM``: the disk's random-read rate (ratios are to disk-16)
  disk-seq        X front to back in 8 MiB ``preadv`` calls: the streaming rate
  mmap-*/pread-*  a Loader epoch (batch --batch, default 256), ``reader="mmap"`` or ``"pread"``,
                  exact shuffle or ``order="block"``
  train-*         the same with a training step per batch: DeepNetwork [D, 64, 16, 1] (ReLU,
                  sigmoid), Adam, float32 (``streamnn-train STORE --hidden 64,16 --batch-size 256``)
  train-compute   the training steps alone, on one batch held in memory: the bound of train-*

For each: samples/s, MB/s, read amplification = bytes read from storage (``read_bytes`` of
``/proc/self/io``) / bytes of the rows delivered, and peak RSS (VmHWM). A second store of the
same rows in uint8 (4x fewer bytes) is measured with the loader methods (--dtypes).
Other work on the machine (disk and cores are shared) skews the figures: the load average is
printed at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

SHAPE = (64, 64, 3)
DROP = "/proc/sys/vm/drop_caches"
LOADER = ["mmap-exact", "pread-exact", "mmap-block", "pread-block"]
DISK = ["disk-1", "disk-4", "disk-16", "disk-seq"]
TRAIN = ["train-compute", "train-pread-exact", "train-mmap-exact"]


# -- measuring, in the worker subprocess ---------------------------------------------------------------
def _proc(path: str, field: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _x_layout(store: str) -> tuple[int, int, int, int]:
    import h5py

    with h5py.File(store, "r") as f:
        dset = f["train/X"]
        return int(dset.id.get_offset()), int(dset.shape[0]), int(dset.shape[1]), dset.dtype.itemsize


def disk_random(store: str, threads: int, seconds: float) -> int:
    offset, n, d, itemsize = _x_layout(store)
    row = d * itemsize
    fd = os.open(store, os.O_RDONLY)
    os.posix_fadvise(fd, offset, n * row, os.POSIX_FADV_RANDOM)
    rows = iter(np.random.default_rng(1).permutation(n).tolist())
    stop = time.perf_counter() + seconds
    done = [0] * threads

    def work(i: int) -> None:
        buf = bytearray(row)
        for r in rows:  # next() on a list iterator is atomic: each row read once
            os.preadv(fd, [buf], offset + r * row)
            done[i] += 1
            if time.perf_counter() > stop:
                return

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    os.close(fd)
    return sum(done)


def disk_sequential(store: str, seconds: float) -> int:
    offset, n, d, itemsize = _x_layout(store)
    fd = os.open(store, os.O_RDONLY)
    buf = bytearray(8 << 20)
    end, pos, stop = offset + n * d * itemsize, offset, time.perf_counter() + seconds
    while pos < end and time.perf_counter() < stop:
        pos += os.preadv(fd, [memoryview(buf)[:min(len(buf), end - pos)]], pos)
    os.close(fd)
    return (pos - offset) // (d * itemsize)


def _model(d: int):
    from streamnn import DeepNetwork, make_optimizer

    model = DeepNetwork([d, 64, 16, 1], ["relu", "relu", "sigmoid"], seed=0)
    opt = make_optimizer("adam", model, lr=1e-4)

    def step(X: np.ndarray, Y: np.ndarray) -> None:
        model.forward(X)
        opt.zero_grad()
        model.backward(Y)
        opt.step()
    return step


def loader_run(store: str, method: str, batch: int, seconds: float) -> tuple[int, dict]:
    from streamnn.data.loader import Loader

    parts = method.split("-")
    reader, order = parts[-2], parts[-1]
    step = _model(int(np.prod(SHAPE))) if parts[0] == "train" else None
    n, stop = 0, time.perf_counter() + seconds
    with Loader(store, "train", batch, seed=0, order=order, reader=reader) as L:
        for X, Y in L:
            if step is not None:
                step(X, Y)
            n += X.shape[1]
            if time.perf_counter() > stop:
                break
        return n, {"reader": L.reader_mode}


def train_compute(store: str, batch: int, seconds: float) -> int:
    from streamnn.data.loader import Loader

    with Loader(store, "train", batch, seed=0, reader="pread") as L:
        X, Y = next(iter(L))
        X, Y = X.copy(), Y.copy()
    step = _model(X.shape[0])
    n, stop = 0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        step(X, Y)
        n += X.shape[1]
    return n


def worker(method: str, store: str, batch: int, seconds: float) -> dict:
    _, _, d, itemsize = _x_layout(store)
    io0 = _proc("/proc/self/io", "read_bytes:")
    extra: dict = {}
    t = time.perf_counter()
    if method.startswith("disk-seq"):
        n = disk_sequential(store, seconds)
    elif method.startswith("disk-"):
        n = disk_random(store, int(method.split("-")[1]), seconds)
    elif method == "train-compute":
        n = train_compute(store, batch, seconds)
    else:
        n, extra = loader_run(store, method, batch, seconds)
    elapsed = time.perf_counter() - t
    read = _proc("/proc/self/io", "read_bytes:") - io0
    return {"method": method, "samples": n, "seconds": elapsed, "samples_per_s": n / elapsed,
            "mb_per_s": n * d * itemsize / elapsed / 1e6, "amplification": read / max(1, n * d * itemsize),
            "peak_rss_mb": _proc("/proc/self/status", "VmHWM:") / 1024, **extra}


# -- the driver --------------------------------------------------------------------------------------------
def mem_total() -> int:
    return _proc("/proc/meminfo", "MemTotal:") * 1024


def drop_page_cache() -> bool:
    if not os.access(DROP, os.W_OK):
        return False
    subprocess.run(["sync"], check=True)
    with open(DROP, "w") as f:
        f.write("3\n")
    return True


def write_store(path: str, rows: int, dtype: str) -> float:
    """Random-ish rows, one 1,000-row chunk at a time (memory stays at a chunk); seconds taken."""
    from streamnn import StoreWriter

    t = time.perf_counter()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1000, *SHAPE), dtype=np.uint8)
    with StoreWriter(path, class_names=["cats", "dogs"], image_shape=SHAPE, dtype=dtype,
                     command="bench_bigstore") as w:
        w.add_split("train", rows)
        for i in range(0, rows, 1000):
            m = min(1000, rows - i)
            chunk = base[:m] + np.uint8(i // 1000 % 251)  # wraps: distinct chunks, no RNG cost
            w.write_rows("train", chunk, rng.integers(0, 2, m), [f"img/{j}.jpg" for j in range(i, i + m)])
        w.commit()
    return time.perf_counter() - t


def run_worker(method: str, store: str, args: argparse.Namespace) -> dict | None:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.blas_threads), OMP_NUM_THREADS=str(args.blas_threads),
               MKL_NUM_THREADS=str(args.blas_threads))
    drop_page_cache()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--store", store,
           "--batch", str(args.batch), "--seconds", str(args.seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        print(f"  {method}: failed: {lines[-1] if lines else proc.returncode}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], bound: float | None) -> None:
    print(f"{'method':<18}{'samples/s':>10}{'MB/s':>7}{'x disk-16':>10}{'read ampl.':>11}{'peak RSS MB':>12}"
          f"{'rows':>9}{'s':>6}  reader")
    for m, r in results.items():
        ratio = f"{r['samples_per_s'] / bound:.2f}" if bound else "-"
        print(f"{m:<18}{r['samples_per_s']:>10.0f}{r['mb_per_s']:>7.0f}{ratio:>10}{r['amplification']:>11.2f}"
              f"{r['peak_rss_mb']:>12.0f}{r['samples']:>9}{r['seconds']:>6.0f}  {r.get('reader', '')}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=None, help="float32 store size in GiB (default: 1.25x RAM)")
    ap.add_argument("--rows", type=int, default=None, help="rows of 64x64x3 instead of --gib")
    ap.add_argument("--dtypes", default="float32,uint8", help="stores measured (same rows each)")
    ap.add_argument("--seconds", type=float, default=30.0, help="time limit of each method (or one epoch)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--methods", default=",".join(DISK + LOADER + TRAIN))
    ap.add_argument("--blas-threads", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where to write the store (the disk measured)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.store, args.batch, args.seconds)))
        return

    row_bytes = int(np.prod(SHAPE)) * 4
    ram = mem_total()
    rows = args.rows or int((args.gib * 2**30 if args.gib else 1.25 * ram) // row_bytes)
    dtypes = [d for d in args.dtypes.split(",") if d]
    need = sum(rows * int(np.prod(SHAPE)) * np.dtype(d).itemsize for d in dtypes) * 1.02 + (1 << 30)
    where = args.dir or tempfile.gettempdir()
    free = shutil.disk_usage(where).free
    print(f"RAM {ram / 1e9:.1f} GB, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"{rows} rows of 64x64x3 ({', '.join(dtypes)}) need {need / 1e9:.1f} GB in {where}, "
          f"{free / 1e9:.1f} GB free", flush=True)
    if need > free:
        raise SystemExit(f"not enough free disk in {where}: need {need / 1e9:.1f} GB (use --gib, --rows or --dir)")
    cold = os.access(DROP, os.W_OK)
    if not cold:
        print(f"cannot write {DROP} (needs root on Linux): the page cache is NOT dropped, figures are not cold")
    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="bench_bigstore_", dir=where) as tmp:
        for dtype in dtypes:
            path = os.path.join(tmp, f"big_{dtype}.h5")
            took = write_store(path, rows, dtype)
            size = os.path.getsize(path)
            print(f"\n== {dtype}: {rows} rows, {size / 1e9:.1f} GB store = {size / ram:.2f}x RAM "
                  f"(written in {took:.0f} s); page cache {'dropped' if cold else 'NOT dropped'} before each "
                  f"method; batch {args.batch}, at most {args.seconds:g} s each ==", flush=True)
            todo = methods if dtype == dtypes[0] else [m for m in methods if m in LOADER or m == "disk-16"]
            results = {}
            for m in todo:
                r = run_worker(m, path, args)
                if r is not None:
                    results[m] = r
                    print(f"  {m}: {r['samples_per_s']:.0f} samples/s, read amplification "
                          f"{r['amplification']:.2f}, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            bound = results.get("disk-16", {}).get("samples_per_s")
            print("\nsummary:")
            report(results, bound)
            for a, b in (("pread-exact", "mmap-exact"), ("pread-block", "mmap-block"),
                         ("pread-block", "pread-exact"), ("train-pread-exact", "train-compute"),
                         ("train-pread-exact", "train-mmap-exact")):
                if a in results and b in results:
                    print(f"  {a} / {b}: {results[a]['samples_per_s'] / results[b]['samples_per_s']:.2f}x")
            os.remove(path)
    print(f"\nstores deleted; load average {os.getloadavg()[0]:.1f} at the end "
          "(disk and cores are shared with other work)")


if __name__ == "__main__":
    main()
