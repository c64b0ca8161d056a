"""The default BLAS thread policy ("auto", streamnn.threads) against every fixed count, idle and with a CPU busy.

Design. Three trainings from a temporary store (synthetic 64x64x3 float32 rows, written with
StoreWriter, deleted afterwards), each through :class:`streamnn.run.trainer.Trainer` as
``streamnn-train`` runs them (loader, prefetch, Adam; no evaluation):

* ``mlp``: [12288, 128, 32, 1], batch 64, the store memory-mapped (in the page cache);
* ``cnn``: conv ``--conv`` + dense 128, batch 64 (the kernel of new runs, "blocked": the count is
  that of its worker threads, BLAS at 1 thread);
* ``pread``: the mlp read with ``--reader pread``, the reader of a store bigger than RAM (its
  16 threads compete with BLAS for the CPUs);

each with ``threads="auto"`` and with every fixed count from 1 to the usable CPUs, in turns
within each repeat (the machine is shared; the order rotates from repeat to repeat), twice: idle (as found) and with one busy-loop
process started by this tool (a CPU taken by another program), which it ends afterwards.
Printed: the median time of a training step (steps after the first two) and, per workload and
load, the ratio of "auto" to the best fixed count (the target: at most 1.10).

Usage::

    python tools/bench_threads.py [--repeats 3] [--steps 12] [--rows 1024] [--conv 32,64,128]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from streamnn.data.writer import StoreWriter  # noqa: E402
from streamnn.run.stop import TrainingInterrupted  # noqa: E402
from streamnn.run.trainer import Trainer  # noqa: E402
from streamnn.threads import choose_threads, usable_cpus  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="steps timed per training (after 2 not timed)")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--conv", default="32,64,128")
    p.add_argument("--only", default="mlp,cnn,pread", help="workloads to run")
    p.add_argument("--loads", default="idle,busy")
    return p.parse_args()


def make_store(path: Path, rows: int) -> Path:
    rng = np.random.default_rng(0)
    with StoreWriter(path, class_names=["a", "b"], image_shape=(64, 64, 3), dtype="float32",
                     options={"size": [64, 64]}) as w:
        w.add_split("train", rows)
        for start in range(0, rows, 256):
            n = min(256, rows - start)
            px = rng.integers(0, 256, (n, 64, 64, 3)).astype(np.uint8)
            w.write_rows("train", px, rng.integers(0, 2, n), [f"{start + i}.jpg" for i in range(n)])
        w.commit()
    return path


def step_time(store: Path, workload: str, threads: str | int, steps: int, conv: list[int]) -> float:
    """Median seconds of a training step (the first two not counted)."""
    config = {"store": str(store), "eval_split": None, "epochs": 1, "batch_size": 64, "threads": threads,
              "model": "cnn" if workload == "cnn" else "mlp", "hidden": [128] if workload == "cnn" else [128, 32],
              "conv": conv, "reader": "pread" if workload == "pread" else "mmap"}
    stamps: list[float] = []

    def hook(t: Trainer) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) >= steps + 3:
            t.request_stop()

    with tempfile.TemporaryDirectory() as out, Trainer(config, out, verbose=False) as trainer:
        try:
            trainer.fit(on_step=hook)
        except TrainingInterrupted:
            pass
    return statistics.median(np.diff(stamps[2:]))


def main() -> None:
    args = parse_args()
    conv = [int(c) for c in args.conv.split(",")]
    cpus = usable_cpus()
    settings: list[str | int] = ["auto", *range(1, cpus + 1)]
    workloads = args.only.split(",")
    print(f"{cpus} usable CPUs; auto gives {choose_threads('auto', loader=True)} thread(s) for training (BLAS "
          "threads; the cnn's blocked convolutions: worker threads, BLAS at 1); "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "bench.h5", args.rows)
        for load in args.loads.split(","):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            try:
                times: dict[tuple[str, str | int], list[float]] = {}
                for r in range(args.repeats):
                    for w in workloads:
                        for s in settings[r % len(settings):] + settings[:r % len(settings)]:  # rotated
                            times.setdefault((w, s), []).append(step_time(store, w, s, args.steps, conv))
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            print(f"\n{load}{' (one busy-loop process)' if busy else ''}, load average now "
                  f"{os.getloadavg()[0]:.1f}; median ms per step of {args.repeats} runs:")
            print(f"  {'workload':<8}" + "".join(f"{str(s):>10}" for s in settings) + "   auto / best fixed")
            for w in workloads:
                med = {s: statistics.median(times[(w, s)]) * 1000 for s in settings}
                best = min(med[s] for s in settings if s != "auto")
                print(f"  {w:<8}" + "".join(f"{med[s]:10.1f}" for s in settings) + f"   {med['auto'] / best:.2f}x")


if __name__ == "__main__":
    main()
