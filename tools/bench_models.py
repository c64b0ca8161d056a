"""Training throughput of streamnn's NumPy networks against the tutorial code and PyTorch.

Design. One run times a training step (forward, backward, Adam step) at a fixed batch size
for each network shape and each contender:

* streamnn float32 and float64 (:class:`streamnn.nn.models.DeepNetwork` + :class:`Adam`);
* the tutorial's float64 code (``tools/tutorial_reference.py``);
* PyTorch on the CPU (Linear/ReLU MLP, BCE-with-logits, ``torch.optim.Adam``), when
  torch is installed; otherwise it is skipped with a message.

All use the same thread count: the BLAS thread variables are set before NumPy is imported
(and threadpoolctl limits the pools when it is installed), and ``torch.set_num_threads``.
Inputs are random rows, one sample a row as a store holds them, passed as ``X = rows.T``.
The machine is noisy: contenders are interleaved within each repeat, each repeat runs for
about ``--seconds``, and the reported figure is the median over ``--repeats``.

Usage: ``python tools/bench_models.py [--threads 2] [--repeats 5] [--batch 64]
[--shapes 12288,128,32,1 150528,64,16,1]``
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

DEFAULT_SHAPES = ["12288,128,32,1", "150528,64,16,1"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one repeat")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES,
                        help="comma-separated layer sizes, input first")
    return parser.parse_args()


ARGS = parse_args()
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)  # before NumPy (or torch) loads a BLAS

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import tutorial_reference as tutorial  # noqa: E402
from streamnn.nn.models import DeepNetwork  # noqa: E402
from streamnn.optim import Adam  # noqa: E402

Step = Callable[[], None]


def limit_threads(threads: int) -> str:
    """Limit the BLAS pools with threadpoolctl if present; describe what NumPy runs on."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas['version']} (threadpoolctl absent: env variables only)"
    threadpool_limits(threads)
    return "; ".join(f"{p['internal_api']} {p['version']} {p.get('architecture', '')} "
                     f"threads={p['num_threads']}" for p in threadpool_info())


class OtherCpu:
    """CPU time used by other processes since creation (Linux /proc/stat), in cores."""

    def __init__(self) -> None:
        self.start = (self._busy_seconds(), self._own_seconds(), time.perf_counter())

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                user, nice, system, idle, iowait, *rest = map(int, f.readline().split()[1:9])
        except (OSError, ValueError):
            return None
        return (user + nice + system + sum(rest)) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def cores_used(self) -> float | None:
        busy, own, wall = self._busy_seconds(), self._own_seconds(), time.perf_counter()
        if busy is None or self.start[0] is None:
            return None
        return max(0.0, (busy - self.start[0]) - (own - self.start[1])) / (wall - self.start[2])


def streamnn_step(shape: list[int], dtype: type, X: np.ndarray, Y: np.ndarray) -> Step:
    model = DeepNetwork(shape, ["relu"] * (len(shape) - 2) + ["sigmoid"], dtype=dtype)
    optimizer = Adam(model, ARGS.lr)
    X, Y = X.astype(dtype), Y.astype(dtype)

    def step() -> None:
        optimizer.zero_grad()
        model.forward(X)
        model.backward(Y)
        optimizer.step()
    return step


def tutorial_step(shape: list[int], X: np.ndarray, Y: np.ndarray) -> Step:
    np.random.seed(0)
    model = tutorial.DeepNetwork(shape, ["relu"] * (len(shape) - 2) + ["sigmoid"])
    optimizer = tutorial.Adam(model.save(), ARGS.lr)
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    return lambda: tutorial.train_step(model, optimizer, X, Y)


def torch_step(torch, shape: list[int], X: np.ndarray, Y: np.ndarray) -> Step:
    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(shape, shape[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])
    optimizer = torch.optim.Adam(net.parameters(), lr=ARGS.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rows, labels = torch.from_numpy(np.ascontiguousarray(X.T)), torch.from_numpy(Y.T.copy())

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(net(rows), labels).backward()
        optimizer.step()
    return step


def timed(step: Step, n: int) -> float:
    """Samples per second over n steps."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return n * ARGS.batch / (time.perf_counter() - start)


def bench_shape(shape: list[int], torch) -> dict[str, float]:
    rng = np.random.default_rng(0)
    X = rng.random((ARGS.batch, shape[0]), dtype=np.float32).T  # features x batch view
    Y = (rng.random((1, ARGS.batch)) < 0.5).astype(np.float32)
    steps = {"streamnn float32": streamnn_step(shape, np.float32, X, Y),
             "streamnn float64": streamnn_step(shape, np.float64, X, Y),
             "tutorial float64": tutorial_step(shape, X, Y)}
    if torch is not None:
        steps["torch float32"] = torch_step(torch, shape, X, Y)
    counts = {}
    for name, step in steps.items():  # warm up, then size a repeat to about ARGS.seconds
        step()
        rate = timed(step, 2)
        counts[name] = max(2, round(rate * ARGS.seconds / ARGS.batch))
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(ARGS.repeats):
        for name, step in steps.items():
            rates[name].append(timed(step, counts[name]))
    for name, values in rates.items():
        print(f"  {name:<18} {statistics.median(values):9.0f} samples/s   "
              f"(min {min(values):.0f}, max {max(values):.0f}, {counts[name]} steps x "
              f"{ARGS.repeats})")
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    try:
        import torch
        torch.set_num_threads(ARGS.threads)
    except ImportError:
        torch = None
    print(f"threads={ARGS.threads} batch={ARGS.batch} repeats={ARGS.repeats} "
          f"optimizer=Adam(lr={ARGS.lr}) numpy={np.__version__}")
    print(f"BLAS: {limit_threads(ARGS.threads)}")
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print("torch: " + (f"{torch.__version__}, {torch.get_num_threads()} threads" if torch
                       else "not installed, skipped (pip install torch==2.13.0 for a CPU build)"))
    other_cpu = OtherCpu()
    for text in ARGS.shapes:
        shape = [int(n) for n in text.split(",")]
        print(f"\nnetwork {shape}, batch {ARGS.batch}")
        median = bench_shape(shape, torch)
        f32, f64, ref = (median["streamnn float32"], median["streamnn float64"],
                         median["tutorial float64"])
        print(f"  ratio streamnn float32 / tutorial float64: {f32 / ref:5.2f}x (target >= 1.8)")
        print(f"  ratio streamnn float64 / tutorial float64: {f64 / ref:5.2f}x")
        if "torch float32" in median:
            print(f"  ratio streamnn float32 / torch float32:    "
                  f"{f32 / median['torch float32']:5.2f}x (target >= 0.9)")
    others = other_cpu.cores_used()
    if others is not None:
        print(f"\nother processes used {others:.2f} cores on average during the run")
        if others > 0.2:
            print("warning: the cores were shared; BLAS threads slow down badly then, so "
                  "rerun on a quiet machine for figures that mean anything")


if __name__ == "__main__":
    main()
