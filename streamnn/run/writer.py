"""The one writer of a run's outputs; under MPI only rank 0 has one.

:class:`RunWriter` writes everything a training run leaves in its folder (through
:class:`streamnn.run.folder.RunDir`): the lock, ``config.json``, ``steps.csv``, ``metrics.csv``,
``curves.png`` and the checkpoints. The trainer holds a :class:`RunWriter` on rank 0 and a
:class:`NoWriter` (same methods, nothing written) on every other rank, chosen once
(:func:`writer_for`), so the training loop never asks which rank it is on. Checkpoint content
is passed as a callable: only the writer that writes computes it.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

from streamnn.run.checkpoint import save_checkpoint
from streamnn.run.folder import CONFIG_JSON, CURVES_METADATA, CURVES_PNG, HISTORY_COLUMNS, METRICS_CSV, RunDir

#: curves.png is redrawn at most this often (and at the last epoch).
CURVES_SECONDS = 5.0


class RunWriter:
    """Writes the run files of one folder (see the module docstring)."""

    def __init__(self, run: RunDir, say: Callable[[str], None]) -> None:
        self.run, self.say = run, say
        self._steps: IO[str] | None = None
        self._curves_drawn: float | None = None
        self._drawing: threading.Thread | None = None

    @contextlib.contextmanager
    def session(self, step: int, config_text: str, history: Mapping[str, Sequence[float]]) -> Iterator[None]:
        """Hold the folder's lock; write config.json, steps.csv cut back to ``step``, metrics.csv
        as of the checkpoint (a crash may have left outputs ahead or behind); close at the end."""
        with self.run.lock():
            self.run.check_run_names()
            for name in self.run.remove_stale_temporaries():
                self.say(f"removed {name}, left by an interrupted write")
            self.run.write_text(CONFIG_JSON, config_text)
            self._steps = self.run.steps_log(step)
            try:
                if history["epoch"]:
                    self.metrics(history)
                yield
            finally:
                self.wait_for_curves()
                self._steps.close()
                self._steps = None

    def log_step(self, step: int, epoch: int, loss: float) -> None:
        """One row of steps.csv (``epoch`` counted from 1), flushed."""
        if self._steps is not None:
            self._steps.write(f"{step},{epoch},{loss!r}\n")
            self._steps.flush()

    def checkpoint(self, name: str, content: Callable[[], dict[str, Any]]) -> str:
        """Write checkpoint ``name`` of the folder atomically; returns its content digest."""
        return save_checkpoint(self.run / name, content())

    def metrics(self, history: Mapping[str, Sequence[float]]) -> None:
        """metrics.csv: one row per epoch, empty cells for metrics not measured, exact (repr) floats."""
        write_metrics_csv(self.run, history)

    def curves(self, history: Mapping[str, Sequence[float]], eval_name: str, final: bool) -> None:
        """curves.png at the first and last epoch, and between them at most every CURVES_SECONDS, drawn
        in a thread of its own (matplotlib's import and a drawing take seconds that training need not
        wait for): one drawing at a time, the final one waited for, and any before the lock is let go."""
        now = time.monotonic()
        if not final and self._curves_drawn is not None and now - self._curves_drawn < CURVES_SECONDS:
            return
        self._curves_drawn = now
        self.wait_for_curves()
        snapshot = {name: list(values) for name, values in history.items()}
        self._drawing = threading.Thread(target=self._draw, args=(snapshot, eval_name), name="streamnn-curves",
                                         daemon=True)
        self._drawing.start()
        if final:
            self.wait_for_curves()

    def _draw(self, history: Mapping[str, Sequence[float]], eval_name: str) -> None:
        try:
            from streamnn.run.plots import save_curves  # lazily: matplotlib is only needed here

            save_curves(history, self.run / CURVES_PNG, eval_name=eval_name, metadata=CURVES_METADATA)
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not stop training
            self.say(f"warning: could not draw {CURVES_PNG} ({exc.__class__.__name__}: {exc})")

    def wait_for_curves(self) -> None:
        """Return once curves.png is drawn (at once when no drawing runs)."""
        if self._drawing is not None:
            self._drawing.join()
            self._drawing = None


class NoWriter:
    """A rank that writes nothing: every :class:`RunWriter` method, doing nothing."""

    @contextlib.contextmanager
    def session(self, step: int, config_text: str, history: Mapping[str, Sequence[float]]) -> Iterator[None]:
        yield

    def log_step(self, step: int, epoch: int, loss: float) -> None:
        pass

    def checkpoint(self, name: str, content: Callable[[], dict[str, Any]]) -> str:
        return ""

    def metrics(self, history: Mapping[str, Sequence[float]]) -> None:
        pass

    def curves(self, history: Mapping[str, Sequence[float]], eval_name: str, final: bool) -> None:
        pass


def writer_for(rank: int, run: RunDir, say: Callable[[str], None]) -> RunWriter | NoWriter:
    """Rank 0 writes the run folder; the other ranks write nothing."""
    return RunWriter(run, say) if rank == 0 else NoWriter()


def write_metrics_csv(run: RunDir, history: Mapping[str, Sequence[float]]) -> None:
    """One row per epoch; empty cells for metrics not measured; exact (repr) floats."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for i in range(len(history["epoch"])):
        row = []
        for c in HISTORY_COLUMNS:
            v = history[c][i]
            row.append("" if math.isnan(v) else str(int(v)) if c in ("epoch", "step", "best") else repr(v))
        writer.writerow(row)
    run.write_text(METRICS_CSV, buf.getvalue())


def read_metrics_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """metrics.csv as a list of row dicts (strings)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
