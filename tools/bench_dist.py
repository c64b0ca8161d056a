"""Data-parallel training speed: K = 1 and K = 2 ranks, one BLAS thread each.

    python tools/bench_dist.py                     # MLP [12288, 256, 64, 1] float32, global batch 128
    python tools/bench_dist.py --model cnn         # the CNN (32x32x3 images, conv 16,32, hidden 64)
    python tools/bench_dist.py --batch 256         # the same at global batch 256
    python tools/bench_dist.py --steps 20 --repeats 2      # quick look

Writes a store of random 64x64x3 images (32x32x3 for the CNN) in a temporary directory
(deleted at the end), then times ``Trainer.fit`` on it under ``mpiexec -n K`` for K = 1 and 2,
alternately, ``--repeats`` times, with ``OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=1`` (K ranks on K
cores). Each run trains ``--steps`` steps of the global batch (the first ``--warmup`` are not
timed: page faults, BLAS warm-up); no evaluation, no checkpoint but the epoch-end one. Reported
per K (medians over the repeats): samples/s, the step time, the time spent in the gradient
allreduce per step (rank 0, wall clock, including waiting for the slower rank), rank 0's CPU
time per step (all its threads: what the step costs without waiting for a core, the figure
to read on a busy machine), the scaling efficiency ``samples/s(K=2) / (2 samples/s(K=1))``, and the bytes one step's allreduce carries
(the flat gradient buffer) with the time a ring allreduce of them would take on a 10 Gbit/s
network (each rank sends and receives ``2 (K - 1) / K`` of the buffer).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    """One rank of a timed run (started by mpiexec): prints JSON on rank 0."""
    from streamnn.dist import world
    from streamnn.run.trainer import Trainer

    comm = world()
    cfg = {"store": args.store, "batch_size": args.batch, "epochs": 1, "eval_split": "none", "dtype": "float32",
           "optimizer": "adam", "lr": 1e-4, "seed": 0}
    cfg.update({"model": "cnn", "conv": [16, 32], "hidden": [64]} if args.model == "cnn" else {"hidden": [256, 64]})
    allreduce_s: list[float] = []
    marks: list[float] = []
    cpu: list[float] = []
    with Trainer(cfg, args.out, verbose=False, comm=comm) as t:
        grads = t.model.flat_grads
        reduce = comm.allreduce

        def timed(*buffers: np.ndarray) -> None:
            start = time.perf_counter()
            reduce(*buffers)
            if buffers and buffers[0] is grads:
                allreduce_s.append(time.perf_counter() - start)

        comm.allreduce = timed  # type: ignore[method-assign]

        def on_step(tr: Trainer) -> None:
            marks.append(time.perf_counter())
            cpu.append(time.process_time())
            if tr.step == args.steps:
                tr.request_stop()

        try:
            t.fit(on_step=on_step)
        except Exception as exc:  # noqa: BLE001 - TrainingInterrupted: the planned stop
            if type(exc).__name__ != "TrainingInterrupted":
                raise
        timed_steps = np.diff(marks[args.warmup:])
        if comm.rank == 0:
            print(json.dumps({"step_s": float(np.median(timed_steps)), "allreduce_s": float(np.median(
                allreduce_s[args.warmup:])), "cpu_s": float(np.median(np.diff(cpu[args.warmup:]))),
                "grad_bytes": int(grads.nbytes), "params": int(grads.size)}))


def run(k: int, store: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [str(mpiexec if mpiexec.is_file() else "mpiexec"), "-n", str(k), sys.executable, __file__, "--worker",
           "--store", str(store), "--out", str(out / f"k{k}-{time.monotonic_ns()}"), "--model", args.model,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:  # mpiexec (hydra) leaves a topology file in $TMPDIR
        result = subprocess.run(cmd, capture_output=True, text=True, env={**env, "TMPDIR": tmp}, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--steps", type=int, default=40, help="steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps not timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    shape = (32, 32, 3) if args.model == "cnn" else (64, 64, 3)
    with tempfile.TemporaryDirectory(prefix="bench_dist") as tmp:
        store = Path(tmp) / "bench.h5"
        from bench_loader import make_store  # tools/ is on sys.path when this file runs as a script

        make_store(str(store), args.batch * (args.steps + 1), shape=shape, command="bench_dist")
        runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for k in (1, 2):
                runs[k].append(run(k, store, Path(tmp), args))
    med = {k: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for k, rs in runs.items()}
    grad_bytes = med[1]["grad_bytes"]
    print(f"{args.model}: {int(med[1]['params']):,} parameters, float32, global batch {args.batch}, "
          f"{args.steps - args.warmup} timed steps, medians of {args.repeats} runs, 1 BLAS thread per rank")
    print(f"load average when done: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'ranks':>5} {'samples/s':>10} {'step ms':>8} {'allreduce ms':>13} {'rank 0 CPU ms/step':>19}")
    for k in (1, 2):
        print(f"{k:>5} {args.batch / med[k]['step_s']:>10.0f} {1e3 * med[k]['step_s']:>8.1f} "
              f"{1e3 * med[k]['allreduce_s']:>13.2f} {1e3 * med[k]['cpu_s']:>19.1f}")
    speedup = med[1]["step_s"] / med[2]["step_s"]
    print(f"speed-up 2 ranks / 1 rank: {speedup:.2f}x (scaling efficiency {speedup / 2:.0%}; target >= 1.7x); "
          f"CPU time per step, 1 rank / rank 0 of 2: {med[1]['cpu_s'] / med[2]['cpu_s']:.2f}x")
    ring = 2 * (2 - 1) / 2 * grad_bytes
    print(f"allreduce per step: {grad_bytes / 1e6:.1f} MB of float32 gradients (one buffer); a ring allreduce "
          f"on 2 ranks sends and receives {ring / 1e6:.1f} MB per rank: {1e3 * ring * 8 / 10e9:.1f} ms at 10 Gbit/s "
          f"(K ranks: 2(K-1)/K of it, under {1e3 * 2 * grad_bytes * 8 / 10e9:.1f} ms)")


if __name__ == "__main__":
    main()
