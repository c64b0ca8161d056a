"""The whole CNN training command against an equivalent PyTorch loop over the same rows, in one run.

Design. Each contender runs as a process of its own (start-up and imports count), in turns within
each repeat (the order rotating from repeat to repeat: the machine is shared), for each count of
``--threads``:

* streamnn: ``streamnn-train STORE --model cnn --conv C --hidden H --epochs E --batch-size B
  --threads N --out TMP`` (a new temporary folder each time): everything the command does, its
  checks of the store, the loader, the evaluation of the test split after every epoch, the
  checkpoints, ``metrics.csv`` and ``curves.png``;
* pytorch: a child of this tool that reads the store's training and test rows into memory, as
  NCHW float32 tensors, and trains the same network (``Conv2d`` 3x3 "same" + ``ReLU`` +
  ``MaxPool2d(2)`` per entry, ``Linear`` + ``ReLU``, one logit; ``BCEWithLogitsLoss``, ``Adam``
  lr 1e-3) for E epochs over a seeded permutation of the training rows in batches of B, and
  evaluates the test split (loss and accuracy) after every epoch, with ``torch.set_num_threads(N)``.

Printed: medians over ``--repeats`` of the wall seconds and CPU seconds (the process and its
threads) of each, and the ratio pytorch / streamnn of the wall times (above 1: streamnn's command
is faster), with the load average. ``--profile`` instead runs the command once in this process
under cProfile (CPU time of the process) and prints the streamnn functions by cumulative time,
and the time of its start-up (``python -c "import streamnn.cli.train"``).

Usage::

    python tools/bench_cnn_command.py STORE [--epochs 2] [--batch 64] [--threads 1,2] [--repeats 3]
    python tools/bench_cnn_command.py STORE --profile [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("store", help="a store of 3-channel images and two classes, with a test split (streamnn-pack)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--conv", default="32,64,128")
    p.add_argument("--hidden", default="128")
    p.add_argument("--threads", default="1,2", help="thread counts, each measured in this run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900, help="seconds a contender may take")
    p.add_argument("--profile", action="store_true", help="profile the command in this process")
    p.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def train_command(args: argparse.Namespace, threads: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "streamnn.cli.train", args.store, "--model", "cnn", "--conv", args.conv,
            "--hidden", args.hidden, "--epochs", str(args.epochs), "--batch-size", str(args.batch),
            "--threads", str(threads), "--out", str(out), "-q"]


def torch_loop(args: argparse.Namespace, threads: int) -> None:
    """The PyTorch twin of the command (see the module docstring); prints its last test accuracy."""
    import numpy as np
    import torch

    from streamnn.data.store import open_store

    torch.set_num_threads(threads)
    with open_store(args.store) as s:
        (h, w, c), splits = s.image_shape, {}
        for split in ("train", "test"):
            X = np.asarray(s.dataset(split)[:], dtype=np.float32)
            if s.dataset(split).dtype == np.uint8:
                X /= 255
            splits[split] = (torch.from_numpy(np.ascontiguousarray(X.reshape(-1, h, w, c).transpose(0, 3, 1, 2))),
                             torch.from_numpy(np.asarray(s.labels(split), dtype=np.float32)))
    torch.manual_seed(0)
    layers: list = []
    channels, rows, cols = c, h, w
    for filters in (int(f) for f in args.conv.split(",")):
        layers += [torch.nn.Conv2d(channels, filters, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        channels, rows, cols = filters, rows // 2, cols // 2
    layers.append(torch.nn.Flatten())
    features = channels * rows * cols
    for units in (int(u) for u in args.hidden.split(",") if u):
        layers += [torch.nn.Linear(features, units), torch.nn.ReLU()]
        features = units
    net = torch.nn.Sequential(*layers, torch.nn.Linear(features, 1))
    opt, loss_fn = torch.optim.Adam(net.parameters(), 1e-3), torch.nn.BCEWithLogitsLoss()
    (X, y), (Xt, yt) = splits["train"], splits["test"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.epochs):
        net.train()
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), args.batch):
            rows = order[start:start + args.batch]
            opt.zero_grad()
            loss_fn(net(X[rows]).squeeze(1), y[rows]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(Xt[i:i + 256]).squeeze(1) for i in range(0, len(yt), 256)])
            accuracy = float(((logits > 0).float() == yt).float().mean())
    print(f"test accuracy {accuracy:.4f}")


def timed(command: list[str], timeout: float) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a child process; an error if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"Error: {' '.join(command[:4])}... failed:\n{done.stdout}{done.stderr}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def compare(args: argparse.Namespace) -> None:
    counts = [int(t) for t in args.threads.split(",")]
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for threads in counts:
                names = ["streamnn", "pytorch"][r % 2:] + ["streamnn", "pytorch"][:r % 2]
                for name in names:
                    if name == "streamnn":
                        out = Path(tmp) / f"run-{r}-{threads}"
                        command = train_command(args, threads, out)
                    else:
                        command = [sys.executable, __file__, args.store, "--torch-child", "--threads", str(threads),
                                   "--epochs", str(args.epochs), "--batch", str(args.batch), "--conv", args.conv,
                                   "--hidden", args.hidden]
                    times.setdefault((name, threads), []).append(timed(command, args.timeout))
                    if name == "streamnn":
                        shutil.rmtree(out)
            load.append(os.getloadavg()[0])
    print(f"whole command: CNN conv {args.conv} hidden {args.hidden}, {args.epochs} epochs, batch {args.batch}, "
          f"{args.store}; medians of {args.repeats}; load average {min(load):.1f}-{max(load):.1f}")
    for threads in counts:
        med = {name: (statistics.median(w for w, _ in times[(name, threads)]),
                      statistics.median(c for _, c in times[(name, threads)])) for name in ("streamnn", "pytorch")}
        print(f"  {threads} thread(s): streamnn-train {med['streamnn'][0]:6.1f} s ({med['streamnn'][1]:6.1f} s CPU), "
              f"pytorch loop {med['pytorch'][0]:6.1f} s ({med['pytorch'][1]:6.1f} s CPU): "
              f"ratio pytorch / streamnn {med['pytorch'][0] / med['streamnn'][0]:.2f}x "
              f"(CPU {med['pytorch'][1] / med['streamnn'][1]:.2f}x)")


def profile(args: argparse.Namespace) -> None:
    import cProfile
    import io
    import pstats

    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import streamnn.cli.train"], check=True, cwd=ROOT)
    print(f"start-up (python -c 'import streamnn.cli.train'): {time.perf_counter() - started:.2f} s wall; "
          f"load average {os.getloadavg()[0]:.1f}")
    sys.path[:0] = [str(ROOT)]
    from streamnn.cli.train import main

    with tempfile.TemporaryDirectory() as tmp:
        profiler = cProfile.Profile(time.process_time)
        cpu = time.process_time()
        profiler.enable()
        try:
            main(train_command(args, int(args.threads.split(",")[0]), Path(tmp) / "run")[3:], standalone_mode=False)
        finally:
            profiler.disable()
    print(f"the command: {time.process_time() - cpu:.1f} s CPU (this process); by cumulative CPU time:")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(r"streamnn/(run|data|cli|nn)", 30)
    print(text.getvalue())


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.torch_child:
        sys.path[:0] = [str(ROOT)]
        torch_loop(ARGS, int(ARGS.threads))
    elif ARGS.profile:
        profile(ARGS)
    else:
        compare(ARGS)
