#!/usr/bin/env python
"""A/B of the two ways ``streamnn-pack --workers N`` can decode: this process as one of the N
decoders (N - 1 worker processes; the default) or N worker processes with this process only
collecting results (``Decoder.decode_while_booting = False``).

    python tools/bench_pack_decoders.py /work/shared/data/cat-and-dog/dataset [--workers 2] [--repeats 4]

The files are read once first (warm page cache); the two modes alternate, each packing the
folder at 64x64 (float32) into a temporary store; prints the median wall time and CPU time
(this process and its reaped children, user + system) per image, and the ratio.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

from streamnn.pack import pack
from streamnn.pack.pool import Decoder


def _cpu() -> float:
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    files = [p for p in args.folder.rglob("*") if p.is_file()]
    for p in files:
        p.read_bytes()
    modes = {"this process decodes too": True, f"{args.workers} worker processes": False}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory(prefix="bench-decoders-") as tmp:
        for _ in range(args.repeats):
            for name, parent_decodes in modes.items():
                Decoder.decode_while_booting = parent_decodes
                c, t = _cpu(), time.perf_counter()
                pack(args.folder, Path(tmp) / "s.h5", size=64, workers=args.workers, force=True)
                runs[name].append((time.perf_counter() - t, (_cpu() - c) / len(files) * 1000))
    walls = {name: statistics.median(w for w, _ in v) for name, v in runs.items()}
    base = walls[f"{args.workers} worker processes"]
    for name, v in runs.items():
        print(f"{name:28s} wall {walls[name]:5.2f} s ({len(files) / walls[name]:5.0f} images/s, "
              f"{base / walls[name]:4.2f}x)  CPU {statistics.median(c for _, c in v):.2f} ms/image")


if __name__ == "__main__":
    main()
