"""Stopping a training run on SIGINT / SIGTERM at one step agreed on by every rank.

A signal only sets this rank's flag (:meth:`StopAgreement.request`); a second one aborts at
once (KeyboardInterrupt). The trainer acts on the *agreed* flags, summed over the ranks by
an allreduce, at the same points on every rank (after a step, at epoch end, before each
evaluation batch), so all ranks stop at one step, save, and raise
:class:`TrainingInterrupted` together.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from streamnn.dist import Comm
from streamnn.paths import path_text


class TrainingInterrupted(Exception):
    """Raised by :meth:`streamnn.run.trainer.Trainer.fit` after saving a checkpoint because of SIGINT or SIGTERM."""

    def __init__(self, signum: int, checkpoint: Path, epoch: int, step: int) -> None:
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped at step {step} (epoch {epoch + 1}); state saved to {path_text(checkpoint)}")

    @property
    def exit_code(self) -> int:
        """128 + signal number, as shells report a death by that signal (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


class AgreedStop(Exception):
    """A stop the ranks agreed on during the epoch-end evaluation."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopAgreement:
    """This rank's stop request (a signal number, or None) and the ranks' agreement on it."""

    def __init__(self, comm: Comm, say: Callable[[str], None]) -> None:
        self.comm = comm
        self.say = say
        self.signum: int | None = None  # a signal this rank received (the ranks agree before acting on it)

    def request(self, signum: int) -> None:
        """Ask for a stop after the current step (what the signal handler does)."""
        self.signum = signum

    def flags(self) -> np.ndarray:
        """This rank's [SIGINT, SIGTERM] flags, to be summed over the ranks."""
        return np.array([self.signum == signal.SIGINT, self.signum == signal.SIGTERM], np.float64)

    def agreed(self) -> int | None:
        """The stop every rank agrees on now (a collective: all ranks call it at the same point)."""
        flags = self.flags()
        self.comm.allreduce(flags)
        return agreed_signal(flags)

    @contextlib.contextmanager
    def signal_handlers(self) -> Iterator[None]:
        """SIGINT/SIGTERM: first one sets the stop flag; a second one aborts at once (KeyboardInterrupt)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.signum is not None:
                raise KeyboardInterrupt
            self.signum = signum
            self.say(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
                     "(send it again to abort without saving)")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def agreed_signal(flags: np.ndarray) -> int | None:
    """From the summed [SIGINT, SIGTERM] flags of the ranks: SIGTERM if any rank had it, else SIGINT."""
    return signal.SIGTERM if flags[1] else signal.SIGINT if flags[0] else None
