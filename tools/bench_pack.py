#!/usr/bin/env python
"""Benchmark streamnn-pack against the tutorial's loop on a real image folder.

    python tools/bench_pack.py /work/shared/data/cat-and-dog/dataset [--sizes 64,224] [--repeats 3]

Every measurement runs in its own subprocess, after one untimed pass that reads every file
(warm page cache), and is repeated; the table shows medians:

- ``tutorial``: ``cv2.imread(p) / 255``, ``cv2.resize``, append to a list, ``np.array``
  (everything in memory, one core);
- ``pack w=1`` and ``pack w=N``: the ``streamnn-pack`` command with 1 and all N cores
  (a float32 store unless ``--dtype``, written to a temporary folder and deleted).

images/s counts the files over the work time measured inside the process (imports and
interpreter start-up excluded; "wall" is the whole command). Peak memory is sampled every
20 ms over the process *and its children* (the pool): the sum of their RSS (shared library
pages counted once per process, so an overestimate) and of their PSS (shared pages split).
"CPU ms/img" is the CPU time (user + system) of the whole process tree per file, start-up
included: on a machine shared with other jobs it is steadier than images/s.
A last section packs growing subsets to show that memory does not grow with the image count.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TUTORIAL = r"""
import json, os, sys, time
import cv2, numpy as np
root, size = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
X, y, n = [], [], 0
for split in sorted(os.listdir(root)):
    classes = sorted(d for d in os.listdir(os.path.join(root, split)) if not d.startswith("."))
    for label, cls in enumerate(classes):
        folder = os.path.join(root, split, cls)
        for name in sorted(os.listdir(folder)):
            img = cv2.imread(os.path.join(folder, name))
            n += 1
            if img is None:
                continue
            img = img / 255
            img = cv2.resize(img, (size, size))
            X.append(img)
            y.append(label)
X, y = np.array(X), np.array(y)
print(json.dumps({"seconds": time.perf_counter() - t0, "files": n, "shape": list(X.shape)}))
"""


def _tree_pids(root: int) -> list[int]:
    """``root`` and its descendants, from /proc/<pid>/task/<tid>/children (cheap, no /proc scan)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return pids


def _memory_kb(pids: list[int]) -> tuple[int, int]:
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss, pss


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; return its stdout, wall time, peak RSS/PSS (MB) and CPU seconds of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_pss = 0
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        pids = _tree_pids(proc.pid)
        rss, pss = _memory_kb(pids)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        for pid in pids:
            cpu[pid] = max(cpu.get(pid, 0.0), _cpu_seconds(pid))
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return {"stdout": out, "wall": time.perf_counter() - t0, "rss_mb": peak_rss / 1024, "pss_mb": peak_pss / 1024,
            "cpu": sum(cpu.values())}


def run_tutorial(folder: Path, size: int) -> dict:
    m = measure([sys.executable, "-c", TUTORIAL, str(folder), str(size)])
    info = json.loads(m["stdout"])
    return {**m, "seconds": info["seconds"], "files": info["files"]}


def run_pack(folder: Path, size: int, workers: int, out: Path, per_class: int | None = None,
             dtype: str = "float32") -> dict:
    cmd = [sys.executable, "-m", "streamnn.cli.pack", str(folder), "-o", str(out), "--force",
           "--size", str(size), "--workers", str(workers), "--max-skip-fraction", "1", "--dtype", dtype]
    if per_class:
        cmd += ["--per-class", str(per_class)]
    m = measure(cmd)
    found = re.search(r": (\d+) images of .* \((\d+) images/s\)", m["stdout"])
    skipped = re.search(r"Skipped (\d+) file", m["stdout"])
    if not found:
        raise SystemExit(f"unexpected output of streamnn-pack:\n{m['stdout']}")
    files = int(found.group(1)) + (int(skipped.group(1)) if skipped else 0)
    out.unlink()
    return {**m, "seconds": files / int(found.group(2)), "files": files}


def median_run(fn, repeats: int) -> dict:
    runs = [fn() for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in ("seconds", "wall", "rss_mb", "pss_mb", "files", "cpu")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="image tree (e.g. the Kaggle dataset folder)")
    parser.add_argument("--sizes", default="64,224", help="comma-separated square sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="'all cores' (default: all)")
    parser.add_argument("--dtype", default="float32", help="stored dtype for streamnn-pack (uint8: 4x less to write)")
    args = parser.parse_args()
    files = [p for p in args.folder.rglob("*") if p.is_file()]
    for p in files:  # warm the page cache
        p.read_bytes()
    print(f"{len(files)} files under {args.folder}; {args.workers} cores; store dtype {args.dtype}; "
          f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; median of {args.repeats} runs")
    print(f"{'size':>5} {'method':<12} {'images/s':>9} {'work s':>7} {'wall s':>7} {'peak RSS MB':>12} "
          f"{'peak PSS MB':>12} {'CPU ms/img':>11}")
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        out = Path(tmp) / "bench.h5"
        for size in (int(s) for s in args.sizes.split(",")):
            results = {
                "tutorial": median_run(lambda: run_tutorial(args.folder, size), args.repeats),
                "pack w=1": median_run(lambda: run_pack(args.folder, size, 1, out, dtype=args.dtype), args.repeats),
                f"pack w={args.workers}": median_run(
                    lambda: run_pack(args.folder, size, args.workers, out, dtype=args.dtype), args.repeats),
            }
            for name, r in results.items():
                r["rate"] = r["files"] / r["seconds"]
                print(f"{size:>5} {name:<12} {r['rate']:>9.0f} {r['seconds']:>7.2f} {r['wall']:>7.2f} "
                      f"{r['rss_mb']:>12.0f} {r['pss_mb']:>12.0f} {1000 * r['cpu'] / r['files']:>11.2f}")
            base = results["tutorial"]
            for name in list(results)[1:]:
                r = results[name]
                print(f"{'':>5} {name} vs tutorial: {r['rate'] / base['rate']:.1f}x images/s "
                      f"({base['wall'] / r['wall']:.1f}x wall), {r['pss_mb'] / base['pss_mb']:.2f}x peak PSS")
        print("memory vs image count (64x64, all cores):")
        for per_class in (50, 200, None):
            r = median_run(lambda: run_pack(args.folder, 64, args.workers, out, per_class), 1)
            print(f"  {int(r['files']):>6} files: peak RSS {r['rss_mb']:.0f} MB, PSS {r['pss_mb']:.0f} MB")
    print(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


if __name__ == "__main__":
    main()
