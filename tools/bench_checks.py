"""Cost of the per-batch pixel check (streamnn.data.store.checked_batches) next to a training step.

    python tools/bench_checks.py [--features 12288] [--batch 64] [--repeats 30]

Prints the median time of the check (a sum per batch, ``isfinite`` of the result) and of one
forward + backward step of the default mlp (128, 32), and their ratio.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from streamnn.nn.models import DeepNetwork


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=12288)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    X = rng.random((args.features, args.batch), dtype=np.float32)
    Y = (rng.random((1, args.batch)) > 0.5).astype(np.float32)
    model = DeepNetwork([args.features, 128, 32, 1], ["relu", "relu", "sigmoid"])

    def step() -> None:
        model.forward(X, True)
        model.backward(Y)

    check = median_seconds(lambda: np.isfinite(X.sum()), args.repeats)
    train = median_seconds(step, args.repeats)
    print(f"pixel check {check * 1e3:.3f} ms, training step {train * 1e3:.2f} ms, ratio {check / train:.4f}")


if __name__ == "__main__":
    main()
