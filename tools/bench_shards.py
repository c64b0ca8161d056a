#!/usr/bin/env python
"""Benchmark reading a sharded store against a one-file store of the same rows.

    python tools/bench_shards.py                      # 8,000 rows of 64x64x3, K = 2 and 4, float32 and uint8
    python tools/bench_shards.py --rows 4000 --shards 3 --repeats 3
    python tools/bench_shards.py --pack /work/shared/data/cat-and-dog/dataset   # packing: MPI vs workers

Writes, in a temporary folder (deleted at the end), a one-file store of random pixels and
the same rows as sharded stores (K shards written with StoreWriter, indexed by
:func:`streamnn.pack.sharded.write_index`, exactly as ``streamnn-pack --shards K`` lays them out),
then runs Loader epochs (exact shuffle, batch 64, prefetch 2) over each, alternating the
stores so that noise hits them alike. Prints the median samples/s of each and the ratio
sharded / one-file (the issue's target: >= 0.9), and, for reference, h5py reading the
virtual dataset directly (``X[sorted batch rows]``), what a loader without the segment
reader would do. The page cache is warm (the stores were just written).

``--pack SRC`` instead times packing SRC at 64x64 (float32; the files read once first, so the
page cache is warm) with ``streamnn-pack --workers N``, ``streamnn-pack --shards N --workers
N`` and ``mpiexec -n N streamnn-pack --workers 1`` (N = --ranks, default 2), each the whole
command's wall time (interpreter and MPI start-up included), the three alternating, medians,
and images/s relative to the first.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from streamnn.data.loader import Loader
from streamnn.data.format import part_name, shard_folder
from streamnn.dist import part
from streamnn.pack.sharded import write_index
from streamnn.data.writer import StoreWriter

BATCH = 64
SHAPE = (64, 64, 3)


def _write(path: Path, pixels: np.ndarray, labels: np.ndarray, paths: list[str], dtype: str) -> None:
    with StoreWriter(path, class_names=["a", "b"], image_shape=SHAPE, dtype=dtype) as w:
        w.add_split("train", len(pixels))
        for i in range(0, len(pixels), 512):
            w.write_rows("train", pixels[i:i + 512], labels[i:i + 512], paths[i:i + 512])
        w.commit()


def make_stores(folder: Path, rows: int, shard_counts: list[int], dtype: str) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (rows, *SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 2, rows)
    paths = [f"img/{i}.jpg" for i in range(rows)]
    stores = {"one-file": folder / f"one-{dtype}.h5"}
    _write(stores["one-file"], pixels, labels, paths, dtype)
    for k in shard_counts:
        index = folder / f"k{k}-{dtype}.h5"
        shard_folder(index).mkdir()
        for r in range(k):
            mine = part(rows, r, k)
            _write(shard_folder(index) / part_name(r, k), pixels[mine], labels[mine], paths[mine], dtype)
        write_index(index, k, store_kwargs={"class_names": ["a", "b"], "image_shape": SHAPE, "dtype": dtype},
                    options={}, splits=["train"], stats=None, skipped=[])
        stores[f"{k} shards"] = index
    return stores


def loader_epoch(path: Path, reader: str) -> float:
    with Loader(path, "train", BATCH, seed=0, reader=reader) as loader:
        t = time.perf_counter()
        n = sum(x.shape[1] for x, _ in loader)
        return n / (time.perf_counter() - t)


def vds_epoch(path: Path, max_batches: int = 40) -> float:
    """h5py through the virtual dataset, a sorted batch per call (a subset, extrapolated)."""
    with h5py.File(path, "r") as f:
        X = f["train/X"]
        perm = np.random.default_rng(1).permutation(X.shape[0])
        t, n = time.perf_counter(), 0
        for i in range(0, min(len(perm), max_batches * BATCH), BATCH):
            rows = np.sort(perm[i:i + BATCH])
            n += len(X[rows])
        return n / (time.perf_counter() - t)


def bench_pack(src: Path, ranks: int, repeats: int) -> None:
    files = [p for p in src.rglob("*") if p.is_file()]
    for p in files:
        p.read_bytes()
    pack = [sys.executable, "-m", "streamnn.cli.pack", str(src), "--size", "64", "-q", "--force"]
    commands = {f"streamnn-pack --workers {ranks}": [*pack, "--workers", str(ranks)],
                f"streamnn-pack --shards {ranks} --workers {ranks}": [*pack, "--shards", str(ranks),
                                                                      "--workers", str(ranks)]}
    if shutil.which("mpiexec"):
        commands[f"mpiexec -n {ranks} streamnn-pack --workers 1"] = ["mpiexec", "-n", str(ranks), *pack,
                                                                    "--workers", "1"]
    times: dict[str, list[float]] = {name: [] for name in commands}
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        for _ in range(repeats):
            for name, cmd in commands.items():
                t = time.perf_counter()
                subprocess.run([*cmd, "-o", os.path.join(tmp, "s.h5")], check=True)
                times[name].append(time.perf_counter() - t)
    print(f"packing {len(files)} files at 64x64, whole-command wall time, median of {repeats} "
          f"(load average {os.getloadavg()[0]:.1f})")
    base = statistics.median(times[next(iter(times))])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:45s} {med:6.2f} s  {len(files) / med:6.0f} images/s   ratio {base / med:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--shards", default="2,4", help="comma-separated shard counts")
    ap.add_argument("--dtypes", default="float32,uint8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--readers", default="mmap", help="loader readers to compare (mmap, pread)")
    ap.add_argument("--pack", type=Path, default=None, help="time packing this image folder instead")
    ap.add_argument("--ranks", type=int, default=2, help="processes for --pack")
    args = ap.parse_args()
    if args.pack is not None:
        bench_pack(args.pack, args.ranks, args.repeats)
        return
    counts = [int(k) for k in args.shards.split(",")]
    print(f"{args.rows} rows of {'x'.join(map(str, SHAPE))}, batch {BATCH}, exact shuffle, "
          f"median of {args.repeats} epochs (samples/s)")
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        for dtype in args.dtypes.split(","):
            stores = make_stores(Path(tmp), args.rows, counts, dtype)
            for reader in args.readers.split(","):
                for path in stores.values():
                    loader_epoch(path, reader)  # map (or cache) the pages once
                runs: dict[str, list[float]] = {name: [] for name in stores}
                for _ in range(args.repeats):
                    for name, path in stores.items():
                        runs[name].append(loader_epoch(path, reader))
                base = statistics.median(runs["one-file"])
                for name, values in runs.items():
                    med = statistics.median(values)
                    print(f"  {dtype:8s} {reader:6s} {name:9s} loader {med:9.0f}   ratio {med / base:5.2f}")
            last = list(stores)[-1]
            vds = vds_epoch(stores[last])
            print(f"  {dtype:8s} {last:9s} h5py X[sorted rows] through the virtual dataset {vds:7.0f}   "
                  f"ratio {vds / base:5.2f} (to the last reader's one-file)")
            for path in stores.values():
                path.unlink()
            for k in counts:
                for part in shard_folder(Path(tmp) / f"k{k}-{dtype}.h5").iterdir():
                    part.unlink()
                shard_folder(Path(tmp) / f"k{k}-{dtype}.h5").rmdir()

if __name__ == "__main__":
    main()
