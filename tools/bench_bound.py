"""The loader at its bound: the loader against the in-memory gather of the same permutation, in
one process (``python tools/bench_loader.py --bound``, which imports this module; so does its
``memory`` method).
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np

BATCH = 64


def load_split(store: str, split: str = "train") -> np.ndarray:
    """X of ``split`` read into memory (64 MB at a time)."""
    import h5py

    with h5py.File(store, "r") as f:
        dset = f[split]["X"]
        data = np.empty(dset.shape, dset.dtype)
        step_rows = max(1, (64 << 20) // (dset.shape[1] * dset.dtype.itemsize))
        for i in range(0, dset.shape[0], step_rows):
            dset.read_direct(data, np.s_[i:i + step_rows], np.s_[i:i + step_rows])
    return data


class Gather:
    """The in-memory gather, the loader's bound: the rows from ``data`` (in memory) into one reused
    buffer, normalized to float32 (``stored * scale``). ``how``: "take" (the bound: one ``np.take``,
    float16 / uint8 rows into a staging buffer and one mixed-type ``np.multiply`` into the
    buffer, as plain NumPy code would), "2pass" (the same, then a cast and a float32 multiply in
    place: the same values) or "rows" (one assignment per row, cast on the way, then the multiply
    in place: how the loader gathers rows of 8 KiB or more)."""

    def __init__(self, data: np.ndarray, scale: float, batch: int = BATCH, how: str = "take") -> None:
        self.data, self.s32, self.how = data, np.float32(scale), how
        self.direct = data.dtype == np.float32 and scale == 1.0
        self.buf = np.empty((batch, data.shape[1]), np.float32)
        self.stage = np.empty((batch, data.shape[1]), data.dtype)

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        out = self.buf[:len(idx)]
        if self.how == "rows":
            for i, r in enumerate(idx.tolist()):
                out[i] = self.data[r]
            if not self.direct:
                np.multiply(out, self.s32, out=out)
        elif self.direct:
            np.take(self.data, idx, axis=0, out=out)
        elif self.how == "2pass":
            np.copyto(out, np.take(self.data, idx, axis=0, out=self.stage[:len(idx)]), casting="unsafe")
            np.multiply(out, self.s32, out=out)
        else:
            np.multiply(np.take(self.data, idx, axis=0, out=self.stage[:len(idx)]), self.s32, out=out,
                        casting="unsafe")
        return out


def measure_bound(store: str, batch: int, rounds: int, segment: int) -> None:
    """The loader against the in-memory gather of the same permutation, in one process.

    Methods: ``memory`` (:class:`Gather`: the bound, ratios are to it), ``memory-2pass`` and
    ``memory-rows`` (the same rows gathered the other ways of :class:`Gather`), ``loader`` (the
    default: batches safe to keep) and ``loader-reuse`` (``reuse_buffers=True``, what the
    trainer uses); exact
    shuffle, seed 0, a bare loop over the batches. Each loader first runs a whole epoch (its
    memory map's page faults), then ``rounds`` rounds run ``segment`` batches of every method in
    turn (in a shuffled order each round), each continuing its own stream, so that the machine's
    load hits all alike. Figures: medians over the rounds of rows/s (wall clock and CPU time of
    the process) and of the round's ratio to ``memory`` (with its quartiles).
    """
    import itertools

    from streamnn import open_store
    from streamnn.data.loader import Loader
    from streamnn.data.order import epoch_order

    data = load_split(store)
    n = len(data)
    loaders = {"loader": Loader(store, "train", batch, seed=0),
               "loader-reuse": Loader(store, "train", batch, seed=0, reuse_buffers=True)}
    for L in loaders.values():
        # What "auto" chooses for a bare loop (the thread would count the other methods' turns
        # as the caller's work between batches and produce batches meanwhile).
        L.prefetch_policy = "inline"
    with open_store(store) as s:
        scale = s.scale
    gathers = {"memory": Gather(data, scale, batch)}
    if not gathers["memory"].direct:
        gathers["memory-2pass"] = Gather(data, scale, batch, how="2pass")
    gathers["memory-rows"] = Gather(data, scale, batch, how="rows")
    orders: dict[int, np.ndarray] = {}
    where = {m: [0, 0] for m in gathers}  # epoch, batch

    def run_gather(m: str, count: int) -> None:
        for _ in range(count):
            epoch, k = where[m]
            if epoch not in orders:
                orders.clear()
                orders[epoch] = epoch_order(np.arange(n), 0, epoch)
            gathers[m](orders[epoch][k * batch:(k + 1) * batch])
            where[m] = [epoch, k + 1] if (k + 1) * batch < n else [epoch + 1, 0]

    def run_loader(m: str, count: int) -> None:
        done = 0
        while done < count:  # an epoch's end stops a loop: start the next
            for _X, _Y in itertools.islice(loaders[m], count - done):
                done += 1

    # The same rows and values: the first batch of epoch 1, each way.
    first = epoch_order(np.arange(n), 0, 1)[:batch]
    for m, L in loaders.items():
        run_loader(m, len(L))  # epoch 0: the map's page faults (not timed)
        X, _ = next(iter(L))
        assert np.array_equal(X.T, gathers["memory"](first)), f"{m}: not the in-memory batch"
        L.position = 0
    methods = {**{m: run_gather for m in gathers}, **{m: run_loader for m in loaders}}
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    load = os.getloadavg()[0]
    shuffle = np.random.default_rng(0)
    for _ in range(rounds):
        for m in shuffle.permutation(list(methods)).tolist():  # no method always follows the same one
            t, c = time.perf_counter(), time.process_time()
            methods[m](m, segment)
            wall[m].append(time.perf_counter() - t)
            cpu[m].append(time.process_time() - c)
    rows = segment * batch
    print(f"{'method':<14}{'rows/s':>10}{'x memory':>10}{'quartiles':>12}{'rows/CPU-s':>12}{'x memory':>10}  notes")
    for m in methods:
        ratio = [b / a for a, b in zip(wall[m], wall["memory"])]
        ratio_cpu = [b / a for a, b in zip(cpu[m], cpu["memory"])]
        q1, _, q3 = statistics.quantiles(ratio, n=4)
        note = ""
        if m in loaders:
            L = loaders[m]
            note = (f"reader {L.reader_mode}, {L.batches_threaded} of "
                    f"{L.batches_threaded + L.batches_inline} batches from the prefetch thread")
        print(f"{m:<14}{rows / statistics.median(wall[m]):>10.0f}{statistics.median(ratio):>10.2f}"
              f"{f'{q1:.2f}-{q3:.2f}':>12}{rows / statistics.median(cpu[m]):>12.0f}"
              f"{statistics.median(ratio_cpu):>10.2f}  {note}")
        if m in loaders:
            loaders[m].close()
    print(f"{rounds} rounds of {segment} batches of {batch} per method, interleaved; load average "
          f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores)")
