#!/usr/bin/env python
"""How the README's recipes were chosen: searches on validation accuracy only, never the test split.

Usage::

    python tools/recipe_search.py --data DATASET [--search mlp|cnn] [--work /tmp/recipe-search]
                                  [--seeds 0,1,2,3,4] [--confirm-seeds 5,6,7,8,9,10,11] [--top 5]
                                  [--only NAME ...] [--jobs 2] [--report]

Every candidate trains with ``--val-fraction 0.15 --eval-split none`` (the test split is not
even evaluated) on each seed; the seed also draws the validation part. A candidate scores its
last-epoch validation accuracy (the recipe quotes the last epoch, so that is what is selected)
and, less noisy, the mean of its last 5 epochs' (the cnn search ranks on that one). The
``--top`` candidates and the baseline are then run on the confirmation seeds, and the table
ranks every candidate by its mean with the paired difference to the baseline (same seeds, hence
the same validation parts) and its standard error. Runs already done in WORK are reused.
``--jobs`` trainings run at once (under ``nice -n 19``), one BLAS thread each; ``--report``
trains nothing and prints the table of the runs already done. The mlp search takes about 14
minutes on 2 cores; the cnn search (docs/recipes.md) about 90 minutes on a busy 2-core machine
for 3 seeds of the 32x32 candidates, more for the 48 and 64 px ones.
"""
from __future__ import annotations

import argparse
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from streamnn.run.writer import read_metrics_csv

COMMON = ["--standardize", "--optimizer", "adam", "--batch-size", "64", "--val-fraction", "0.15",
          "--eval-split", "none", "--no-progress", "-q", "--threads", "1"]
BASELINE = "base"


def candidate(size: int = 32, hidden: str = "64,16", lr: str = "1e-4", wd: str = "1e-3", epochs: int = 60,
              *extra: str) -> tuple[int, list[str]]:
    return size, ["--augment", "flip", "--hidden", hidden, "--lr", lr, "--weight-decay", wd, "--epochs", str(epochs),
                  *extra]


MLP: dict[str, tuple[int, list[str]]] = {
    BASELINE: candidate(),  # the earlier recipe
    "24 px": candidate(24), "48 px": candidate(48),
    "128,32": candidate(32, "128,32"), "256,64": candidate(32, "256,64"),
    "lr 3e-4": candidate(32, "64,16", "3e-4"), "cosine": candidate(32, "64,16", "1e-4", "1e-3", 60,
                                                                   "--lr-schedule", "cosine"),
    "dropout 0.3": candidate(32, "64,16", "1e-4", "1e-3", 60, "--dropout", "0.3"),
    "dropout 0.5": candidate(32, "64,16", "1e-4", "1e-3", 60, "--dropout", "0.5"),
    **{f"wd {wd}": candidate(32, "64,16", "1e-4", wd) for wd in ("3e-3", "1e-2", "1e-1", "1", "3", "10")},
    "30 ep": candidate(32, "64,16", "1e-4", "1e-3", 30), "120 ep": candidate(32, "64,16", "1e-4", "1e-3", 120),
    "batch 32": candidate(32, "64,16", "1e-4", "1e-3", 60, "--batch-size", "32"),
    "128,32, wd 3": candidate(32, "128,32", "1e-4", "3"),
    "128,32, dropout 0.5, 100 ep": candidate(32, "128,32", "1e-4", "1e-3", 100, "--dropout", "0.5"),
    "256,64, dropout 0.5": candidate(32, "256,64", "1e-4", "1e-3", 60, "--dropout", "0.5"),
    **{f"256,64, wd {wd}": candidate(32, "256,64", "1e-4", wd) for wd in ("1", "3", "10")},
    "256,64, 30 ep": candidate(32, "256,64", "1e-4", "1e-3", 30),
    "256,64, wd 3, 30 ep": candidate(32, "256,64", "1e-4", "3", 30),
    "256,64, lr 3e-4, cosine, 30 ep": candidate(32, "256,64", "3e-4", "1e-3", 30, "--lr-schedule", "cosine"),
    "512,128, 30 ep": candidate(32, "512,128", "1e-4", "1e-3", 30),
    "48 px, 256,64, 30 ep": candidate(48, "256,64", "1e-4", "1e-3", 30),
}


def cnn(size: int = 32, conv: str = "32,64,128", head: str = "flatten", epochs: int = 60,
        *extra: str) -> tuple[int, list[str]]:
    """The README's CNN (batch norm, dense 128 with dropout 0.5, flips and shifts of size / 10 px, Adam
    1e-3 cosine) with another image size, conv widths, head, epochs and options."""
    return size, ["--model", "cnn", "--conv", conv, "--batch-norm", "--head", head, "--hidden", "128",
                  "--dropout", "0.5", "--augment", "flip,shift", "--shift", str(round(size / 10)), "--lr", "1e-3",
                  "--lr-schedule", "cosine", "--epochs", str(epochs), *extra]


CNN: dict[str, tuple[int, list[str]]] = {
    BASELINE: cnn(),  # the earlier recipe (32x32, 60 epochs)
    "64 px, 4 blocks, gap, 40 ep": cnn(64, "16,32,64,128", "gap", 40),
    "64 px, 4 blocks, 40 ep": cnn(64, "16,32,64,128", "flatten", 40),
    "48 px, 4 blocks, gap, 40 ep": cnn(48, "16,32,64,128", "gap", 40),
    "100 ep": cnn(32, "32,64,128", "flatten", 100),
    "gap": cnn(32, "32,64,128", "gap"),
    "conv 48,96,192": cnn(32, "48,96,192"),
    "100 ep, ema": cnn(32, "32,64,128", "flatten", 100, "--ema", "0.995"),
    "100 ep, ema, smooth, dense 256": cnn(32, "32,64,128", "flatten", 100, "--ema", "0.995", "--label-smoothing", "0.1",
                                          "--hidden", "256"),
    # (a later --augment wins over cnn()'s "flip,shift")
    "100 ep, ema, smooth, dense 256, erase": cnn(32, "32,64,128", "flatten", 100, "--ema", "0.995",
                                                 "--label-smoothing", "0.1", "--hidden", "256",
                                                 "--augment", "flip,shift,erase"),
}
SEARCHES = {"mlp": MLP, "cnn": CNN}


def run_dir(work: Path, name: str, seed: int) -> Path:
    return work / "runs" / f"{name.replace(' ', '').replace(',', '-')}-seed{seed}"


def val_accuracy(work: Path, candidates: dict[str, tuple[int, list[str]]], name: str, seed: int,
                 train: bool = True) -> tuple[float, float, float] | None:
    """Train candidate ``name`` with ``seed`` (unless done; not at all unless ``train``); its validation
    accuracy at the last epoch and averaged over the last 5, and its last training accuracy (None: not run)."""
    size, options = candidates[name]
    store = work / f"cats{size}.h5"
    out = run_dir(work, name, seed)
    epochs = int(options[options.index("--epochs") + 1])
    if not (out / "metrics.csv").exists() or len(read_metrics_csv(out / "metrics.csv")) < epochs:
        if not train:
            return None
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        subprocess.run(["nice", "-n", "19", "streamnn-train", str(store), *COMMON, *options, "--seed", str(seed),
                        "--out", str(out), "--force"], check=True, env=env)  # the candidate's options come last
    rows = read_metrics_csv(out / "metrics.csv")
    val = [float(row["val_accuracy"]) for row in rows]
    return val[-1], float(np.mean(val[-5:])), float(rows[-1]["train_accuracy"])


def run_all(work: Path, candidates: dict[str, tuple[int, list[str]]], names: list[str], seeds: list[int],
            scores: dict[str, dict[int, tuple[float, float, float]]], jobs: int, train: bool = True) -> None:
    todo = [(n, s) for s in seeds for n in names if s not in scores.setdefault(n, {})]
    with ThreadPoolExecutor(jobs) as pool:
        for (name, seed), acc in zip(todo, pool.map(lambda j: val_accuracy(work, candidates, *j, train), todo)):
            if acc is not None:
                scores[name][seed] = acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--data", required=True, help="the Kaggle cat-and-dog folder (training_set, test_set)")
    ap.add_argument("--search", choices=list(SEARCHES), default="mlp")
    ap.add_argument("--work", default="/tmp/recipe-search")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--confirm-seeds", default="5,6,7,8,9,10,11")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="these candidates only")
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once")
    ap.add_argument("--report", action="store_true", help="train nothing: the table of the runs done in WORK")
    args = ap.parse_args()
    candidates = SEARCHES[args.search]
    names = args.only or list(candidates)
    unknown = set(names) - set(candidates)
    if unknown:
        raise SystemExit(f"unknown candidates {sorted(unknown)}; choose from {list(candidates)}")
    work = Path(args.work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    for size in sorted({candidates[n][0] for n in names}):
        if not (work / f"cats{size}.h5").exists() and not args.report:
            subprocess.run(["streamnn-pack", args.data, "-o", str(work / f"cats{size}.h5"), "--size", str(size)],
                           check=True)
    scores: dict[str, dict[int, tuple[float, float, float]]] = {}
    train = not args.report
    run_all(work, candidates, names, [int(s) for s in args.seeds.split(",")], scores, args.jobs, train)
    rank = 1 if args.search == "cnn" else 0  # which score ranks: the last epoch's or the last 5 epochs' mean
    names = [n for n in names if scores[n]]

    def score(name: str) -> float:
        return -float(np.mean([v[rank] for v in scores[name].values()]))

    if args.confirm_seeds:
        leaders = sorted(names, key=score)[:args.top]
        run_all(work, candidates, sorted({*leaders, BASELINE} & set(names)),
                [int(s) for s in args.confirm_seeds.split(",")], scores, args.jobs, train)
    print("| candidate | seeds | train acc, last epoch | val acc, last epoch | val acc, last 5 epochs "
          "| paired difference to base (se) |\n|---|---|---|---|---|---|")
    for name in sorted(names, key=score):
        seeds = sorted(scores[name])
        acc = np.array([scores[name][s] for s in seeds])
        paired = ""
        if set(seeds) <= set(scores.get(BASELINE, {})) and name != BASELINE:
            diff = acc[:, rank] - np.array([scores[BASELINE][s][rank] for s in seeds])
            se = diff.std(ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else float("nan")
            paired = f"{diff.mean():+.3f} ({se:.3f})"
        print(f"| {name} | {','.join(map(str, seeds))} | {acc[:, 2].mean():.3f} | "
              f"{acc[:, 0].mean():.3f} ± {acc[:, 0].std():.3f} | {acc[:, 1].mean():.3f} ± {acc[:, 1].std():.3f} | "
              f"{paired} |")


if __name__ == "__main__":
    main()
