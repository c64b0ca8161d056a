"""Training throughput of streamnn's NumPy CNN against the same network in PyTorch (CPU), and peak memory.

Design. One run times a training step (forward, loss, backward, Adam step) of the network
``--conv 32,64,128 --hidden 128`` (3x3 "same" conv + ReLU + 2x2 max-pool per entry, flatten,
dense 128 + ReLU, one sigmoid output) on 64x64x3 float32 images, batch 64:

* streamnn: :class:`streamnn.nn.models.ConvNet` + :class:`streamnn.optim.Adam`, inputs as the
  loader gives them (X features x batch, F-ordered, read as NHWC), once per convolution kernel of
  ``--kernels``: ``blocked`` (that of new training runs: blocks of images on worker threads, BLAS
  at 1 thread) and ``im2col`` (that of 0.1.0 and of the runs it wrote: whole-batch products on
  BLAS threads);
* PyTorch: ``Conv2d``/``ReLU``/``MaxPool2d``/``Linear``, ``BCEWithLogitsLoss``, ``torch.optim.Adam``
  (NCHW, oneDNN), skipped with a message when torch is not installed.

All get the same thread count, each count of ``--threads`` in turn in the same run
(:func:`streamnn.threads.use_threads` as training sets it, ``torch.set_num_threads``).
The machine is shared and noisy: contenders alternate within each repeat (the order rotating
from repeat to repeat) and the figures are medians over ``--repeats``, with the CPU seconds a
step took in the process (at 1 thread the least noisy measure on a loaded machine: the time
spent waiting for a CPU is not in it). Then a per-layer profile of the streamnn step for each
kernel at the first thread count (median CPU time of every layer's forward and backward and of the
Adam step).

``--rss STORE`` instead reports peak memory of CNN training: a child process trains
``--steps`` steps on STORE and on a store 10x larger (the training split repeated, written
with :class:`streamnn.StoreWriter` into a temporary folder, deleted afterwards), and prints
its peak RSS (VmHWM; mapped store pages count in it) and its peak private memory (RssAnon).

Usage::

    python tools/bench_cnn.py [--threads 1,2] [--repeats 5] [--steps 3] [--size 64] [--batch 64] [--batch-norm]
    python tools/bench_cnn.py --blocks 512,1024,2048,4096 [--threads 1]
    python tools/bench_cnn.py --rss runs/recipe/cats64.h5 [--steps 60] [--threads 1]

``--blocks`` times each convolution layer of the network alone (forward and backward, the input
gradient for all but the first, CPU ms of the process, medians of ``--repeats``) with the blocked
kernel at each block size (``streamnn.nn.conv.BLOCK_ROWS``, which fixes that kernel's numbers:
a speed measurement only) against the im2col kernel, alternated.
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
from typing import Callable


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="BLAS / torch thread counts, each measured in this run")
    parser.add_argument("--batch-norm", action="store_true", help="a BatchNorm after every convolution (both)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per repeat (with --rss: steps per run)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--conv", default="32,64,128")
    parser.add_argument("--hidden", default="128")
    parser.add_argument("--kernels", default="blocked,im2col", help="streamnn convolution kernels to time")
    parser.add_argument("--blocks", metavar="ROWS", help="time each conv layer of the blocked kernel with blocks of "
                                                          "these sizes (e.g. 512,1024,2048), against im2col")
    parser.add_argument("--rss", metavar="STORE", help="measure peak memory of training on STORE and on 10x it")
    parser.add_argument("--rss-child", metavar="STORE", help=argparse.SUPPRESS)
    return parser.parse_args()


ARGS = parse_args()
THREADS = [int(t) for t in str(ARGS.threads).split(",")]

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from streamnn.nn.models import ConvNet  # noqa: E402
from streamnn.optim import Adam  # noqa: E402
from streamnn.threads import use_threads  # noqa: E402

CONV = [int(c) for c in ARGS.conv.split(",")]
HIDDEN = [int(h) for h in ARGS.hidden.split(",") if h]


def streamnn_step(X: np.ndarray, Y: np.ndarray, kernel: str) -> tuple[ConvNet, Callable[[], None]]:
    model = ConvNet((ARGS.size, ARGS.size, 3), CONV, HIDDEN, 2, seed=0, batch_norm=ARGS.batch_norm,
                    conv_bias=not ARGS.batch_norm, conv_algo=kernel)
    opt = Adam(model, 1e-3)

    def step() -> None:
        P = model.forward(X, train_mode=True)
        model.loss(Y, P)
        model.backward(Y)
        opt.step()

    return model, step


def torch_step(X: np.ndarray, Y: np.ndarray) -> Callable[[], None] | None:
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: skipped (pip install torch==2.13.0, the CPU build)")
        return None
    torch.manual_seed(0)
    layers: list = []
    channels, side = 3, ARGS.size
    for c in CONV:
        layers += [torch.nn.Conv2d(channels, c, 3, padding=1, bias=not ARGS.batch_norm),
                   *([torch.nn.BatchNorm2d(c)] if ARGS.batch_norm else []), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        channels, side = c, side // 2
    layers.append(torch.nn.Flatten())
    features = channels * side * side
    for h in HIDDEN:
        layers += [torch.nn.Linear(features, h), torch.nn.ReLU()]
        features = h
    layers.append(torch.nn.Linear(features, 1))
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    images = torch.from_numpy(np.ascontiguousarray(X.T.reshape(-1, ARGS.size, ARGS.size, 3).transpose(0, 3, 1, 2)))
    target = torch.from_numpy(Y.T.copy())

    def step() -> None:
        opt.zero_grad()
        loss_fn(net(images), target).backward()
        opt.step()

    return step


def timed(step: Callable[[], None]) -> tuple[float, float]:
    """(samples per second, CPU milliseconds of the process per step) over --steps steps."""
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(ARGS.steps):
        step()
    return ARGS.steps * ARGS.batch / (time.perf_counter() - started), (time.process_time() - cpu) / ARGS.steps * 1000


def profile(models: dict[str, ConvNet], X: np.ndarray, Y: np.ndarray) -> None:
    """Median CPU milliseconds (of the process) of every layer's forward and backward, over the repeats, per kernel."""
    times: dict[str, dict[str, list[float]]] = {kernel: {} for kernel in models}
    optimizers = {kernel: Adam(model, 1e-3) for kernel, model in models.items()}
    for _ in range(ARGS.repeats):
        for kernel, model in models.items():
            use_threads(THREADS[0], model=model)
            t_kernel = times[kernel]
            A = X.T.reshape(-1, ARGS.size, ARGS.size, 3)
            for name, layer in model.body.named_layers():
                t = time.process_time()
                A = layer.forward(A, True)
                t_kernel.setdefault(f"{name} forward", []).append(time.process_time() - t)
            d = model._loss.gradient(model._loss.output(A), Y, ARGS.batch)
            for name, layer in reversed(list(model.body.named_layers())):
                t = time.process_time()
                d = layer.backward(d)
                t_kernel.setdefault(f"{name} backward", []).append(time.process_time() - t)
            t = time.process_time()
            optimizers[kernel].step()
            t_kernel.setdefault("adam step", []).append(time.process_time() - t)
    med = {kernel: {k: statistics.median(v) * 1000 for k, v in t.items()} for kernel, t in times.items()}
    first = next(iter(med.values()))
    total = {kernel: sum(m.values()) for kernel, m in med.items()}
    print(f"\nper-layer profile at {THREADS[0]} thread(s), median CPU ms of {ARGS.repeats}; load average "
          f"{os.getloadavg()[0]:.1f}:")
    print(f"  {'part':<20}" + "".join(f"{kernel:>10}" for kernel in med))
    for name in sorted(first, key=lambda n: -first[n]):
        if max(m[name] for m in med.values()) >= 0.005 * max(total.values()):
            print(f"  {name:<20}" + "".join(f"{m[name]:10.1f}" for m in med.values()))
    print(f"  {'total':<20}" + "".join(f"{t:10.1f}" for t in total.values()))


def speed() -> None:
    rng = np.random.default_rng(0)
    X = np.asfortranarray(rng.random((ARGS.size * ARGS.size * 3, ARGS.batch), dtype=np.float32))
    Y = (rng.random((1, ARGS.batch)) < 0.5).astype(np.float32)
    kernels = [k for k in ARGS.kernels.split(",") if k]
    models, steps = {}, {}
    for kernel in kernels:
        models[kernel], steps[f"streamnn {kernel}"] = streamnn_step(X, Y, kernel)
    theirs = torch_step(X, Y)
    if theirs:
        steps["pytorch"] = theirs

    def at(name: str, threads: int) -> None:
        use_threads(threads, model=models["blocked"] if name == "streamnn blocked" else None)
        if name == "pytorch":
            import torch
            torch.set_num_threads(threads)

    for name, step in steps.items():  # warm-up: allocates the reused buffers
        at(name, THREADS[0])
        step()
    rates: dict[tuple[str, int], list[tuple[float, float]]] = {}
    names = list(steps)
    load = [os.getloadavg()[0]]
    for r in range(ARGS.repeats):  # contenders and thread counts in turns, rotated: the machine's load moves
        for threads in THREADS:
            for name in names[r % len(names):] + names[:r % len(names)]:
                at(name, threads)
                rates.setdefault((name, threads), []).append(timed(steps[name]))
        load.append(os.getloadavg()[0])
    print(f"CNN conv {ARGS.conv} hidden {ARGS.hidden}{' batch-norm' if ARGS.batch_norm else ''}, "
          f"{ARGS.size}x{ARGS.size}x3 float32, batch {ARGS.batch}, training step (forward, backward, Adam); "
          f"median of {ARGS.repeats} x {ARGS.steps} steps; load average {min(load):.1f}-{max(load):.1f}")
    for threads in THREADS:
        med = {name: (statistics.median(r for r, _ in rates[(name, threads)]),
                      statistics.median(c for _, c in rates[(name, threads)])) for name in names}
        print(f"  {threads} thread(s):")
        for name in names:
            line = f"    {name:<18} {med[name][0]:7.1f} samples/s  {med[name][1]:7.1f} ms CPU per step"
            if theirs and name != "pytorch":
                line += (f"   ratio to pytorch {med[name][0] / med['pytorch'][0]:.2f}x "
                         f"(CPU {med['pytorch'][1] / med[name][1]:.2f}x)")
            print(line)
    if models:
        profile(models, X, Y)


def block_sizes() -> None:
    """Each conv layer alone, the blocked kernel at each --blocks size against im2col (CPU ms)."""
    from streamnn.nn import Conv2D
    from streamnn.nn import conv as conv_module

    sizes, rng, kept = [int(r) for r in ARGS.blocks.split(",")], np.random.default_rng(0), conv_module.BLOCK_ROWS
    model = ConvNet((ARGS.size, ARGS.size, 3), CONV, HIDDEN, 2, seed=0, conv_algo="blocked")
    use_threads(THREADS[0], model=model)
    print(f"conv layers alone, forward + backward, batch {ARGS.batch}, {THREADS[0]} worker thread(s); median CPU ms "
          f"of {ARGS.repeats}; load average {os.getloadavg()[0]:.1f}")
    print(f"  {'layer':<20}{'im2col':>10}" + "".join(f"{'blocks ' + str(r):>13}" for r in sizes))
    side, channels, totals = ARGS.size, 3, [0.0] * (len(sizes) + 1)
    for n, filters in enumerate(CONV):
        X = rng.random((ARGS.batch, side, side, channels), dtype=np.float32)
        dY = rng.random((ARGS.batch, side, side, filters), dtype=np.float32)
        layers = [Conv2D(filters, algo="im2col")] + [Conv2D(filters, algo="blocked") for _ in sizes]
        for layer in layers:
            layer.build((side, side, channels), rng, np.dtype(np.float32))
            layer.needs_input_grad = n > 0
        times: list[list[float]] = [[] for _ in layers]
        for _ in range(ARGS.repeats + 1):
            for i, layer in enumerate(layers):
                conv_module.BLOCK_ROWS = sizes[i - 1] if i else kept
                started = time.process_time()
                layer.forward(X)
                layer.backward(dY)
                times[i].append((time.process_time() - started) * 1000)
        med = [statistics.median(t[1:]) for t in times]
        totals = [a + b for a, b in zip(totals, med)]
        name = f"conv{n} {side}x{side}x{channels}"
        print(f"  {name:<20}{med[0]:10.1f}" + "".join(f"{m:13.1f}" for m in med[1:]))
        side, channels = side // 2, filters
    conv_module.BLOCK_ROWS = kept
    print(f"  {'total':<20}{totals[0]:10.1f}" + "".join(f"{t:13.1f}" for t in totals[1:]))


# -- peak memory ---------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_child(store: str) -> None:
    """Train --steps steps of the CNN on ``store``; print peak RSS and peak private memory (KiB)."""
    from streamnn.run.stop import TrainingInterrupted
    from streamnn.run.trainer import Trainer

    peak_anon = [0]

    def hook(t: Trainer) -> None:
        peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon"))
        if t.step >= ARGS.steps:
            t.request_stop()

    with tempfile.TemporaryDirectory() as out:
        config = {"store": store, "model": "cnn", "conv": CONV, "hidden": HIDDEN, "batch_size": ARGS.batch,
                  "standardize": True, "augment": "flip,shift", "eval_split": None, "epochs": 1}
        with Trainer(config, out, verbose=False) as trainer:
            try:
                trainer.fit(on_step=hook)
            except TrainingInterrupted:
                pass
    print(f"{_status_kb('VmHWM')} {peak_anon[0]}")


def ten_times(store: str, folder: Path) -> Path:
    """The store's training split repeated 10 times (test split once), written with StoreWriter."""
    from streamnn.data.store import open_store
    from streamnn.data.writer import StoreWriter

    path = folder / "x10.h5"
    with open_store(store) as s:
        splits = {name: (s.dataset(name), s.labels(name)) for name in s.splits}
        dtype = splits["train"][0].dtype
        with StoreWriter(path, class_names=list(s.class_names), image_shape=tuple(s.image_shape),
                         dtype=dtype.name, options=dict(s.options)) as w:
            for name, (X, y) in splits.items():
                times = 10 if name == "train" else 1
                w.add_split(name, len(y) * times)
                for _ in range(times):
                    for start in range(0, len(y), 500):
                        rows = X[start:start + 500]
                        if rows.dtype != np.uint8:  # normalized rows back to the pixels they came from
                            rows = np.clip(np.rint(rows.astype(np.float32) * 255), 0, 255).astype(np.uint8)
                        w.write_rows(name, rows.reshape(len(rows), *s.image_shape), y[start:start + 500],
                                     [f"{name}/{i}" for i in range(start, start + len(rows))])
            stats = s.stats()
            if stats is not None:
                w.set_stats(*stats)
            w.commit()
    return path


def rss(store: str) -> None:
    with tempfile.TemporaryDirectory(dir=Path(store).resolve().parent) as tmp:
        big = ten_times(store, Path(tmp))
        print(f"peak memory of {ARGS.steps} CNN training steps (conv {ARGS.conv}, hidden {ARGS.hidden}, batch "
              f"{ARGS.batch}, flip+shift, standardized):")
        for path in (store, big):
            out = subprocess.run([sys.executable, __file__, "--rss-child", str(path), "--steps", str(ARGS.steps),
                                  "--threads", str(ARGS.threads), "--conv", ARGS.conv, "--hidden", ARGS.hidden,
                                  "--batch", str(ARGS.batch)], capture_output=True, text=True, check=True)
            hwm, anon = (int(v) for v in out.stdout.split())
            size = Path(path).stat().st_size / 2**20
            print(f"  {Path(path).name:<12} {size:8.0f} MiB store: peak RSS {hwm / 1024:7.1f} MiB, "
                  f"peak private (RssAnon) {anon / 1024:7.1f} MiB")


if __name__ == "__main__":
    if ARGS.rss_child:
        rss_child(ARGS.rss_child)
    elif ARGS.blocks:
        block_sizes()
    elif ARGS.rss:
        rss(ARGS.rss)
    else:
        speed()
