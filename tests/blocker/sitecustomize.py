"""Test helper, imported at start-up by every Python process whose PYTHONPATH holds this folder
(a ``streamnn-pack`` run and its worker processes alike), so that tests can signal a run at a
known point instead of racing it:

- ``STREAMNN_TEST_BLOCK_ON=<file name>``: decoding that file waits until the process is killed.
- ``STREAMNN_TEST_EXIT_ON=<file name>``: decoding that file ends the process (``sys.exit(0)``,
  as a rank that leaves without a word; in-process with ``--workers 1``).
- ``STREAMNN_TEST_BLOCK_AT_STEP=<n>``: ``streamnn-train`` waits before step n + 1 until a stop
  is requested (SIGINT / SIGTERM) or the process is killed.
- ``STREAMNN_TEST_BLOCK_IN_SAVE=<n>``: the n-th checkpoint save waits half-way (content written,
  file neither closed nor renamed) until the process is killed.
- ``STREAMNN_TEST_SIGNAL_AT=<rank>:<n>:<SIGNAL>``: under mpiexec, MPI rank ``rank`` of
  ``streamnn-train`` sends itself ``SIGNAL`` (e.g. KILL, TERM) before step n + 1 (a signal
  that reaches one rank only).

On starting to wait, the process creates the file named by ``STREAMNN_TEST_BLOCKED`` (the
test waits for it). The waits are loops of short sleeps: a signal is acted on within 50 ms.
"""
import os
import signal
import sys
import time
from pathlib import Path

BLOCK_ON = os.environ.get("STREAMNN_TEST_BLOCK_ON")
EXIT_ON = os.environ.get("STREAMNN_TEST_EXIT_ON")
BLOCK_AT_STEP = os.environ.get("STREAMNN_TEST_BLOCK_AT_STEP")
BLOCK_IN_SAVE = os.environ.get("STREAMNN_TEST_BLOCK_IN_SAVE")
SIGNAL_AT = os.environ.get("STREAMNN_TEST_SIGNAL_AT")


def _waiting() -> None:
    Path(os.environ["STREAMNN_TEST_BLOCKED"]).touch()


if BLOCK_ON:
    import streamnn.pack.worker

    _load_image = streamnn.pack.worker.load_image

    def _blocking_load_image(path, *args, **kwargs):
        if os.path.basename(path) == BLOCK_ON:
            _waiting()
            while True:
                time.sleep(0.05)
        return _load_image(path, *args, **kwargs)

    streamnn.pack.worker.load_image = _blocking_load_image

if EXIT_ON:
    import streamnn.pack.worker

    _load_image_before_exit = streamnn.pack.worker.load_image

    def _exiting_load_image(path, *args, **kwargs):
        if os.path.basename(path) == EXIT_ON:
            sys.exit(0)
        return _load_image_before_exit(path, *args, **kwargs)

    streamnn.pack.worker.load_image = _exiting_load_image

if BLOCK_AT_STEP:
    import streamnn.run.trainer

    _train_step = streamnn.run.trainer.Trainer._train_step

    def _blocking_train_step(self, X, Y):
        if self.step == int(BLOCK_AT_STEP):
            _waiting()
            while self.stops.signum is None:
                time.sleep(0.05)
        return _train_step(self, X, Y)

    streamnn.run.trainer.Trainer._train_step = _blocking_train_step

if BLOCK_IN_SAVE:
    import streamnn.run.checkpoint

    _write_group = streamnn.run.checkpoint._write_group
    _saves = 0

    def _blocking_write_group(group, content, held):
        global _saves
        _write_group(group, content, held)
        if group.name == "/content":  # the top level of one checkpoint
            _saves += 1
            if _saves == int(BLOCK_IN_SAVE):
                _waiting()
                while True:
                    time.sleep(0.05)

    streamnn.run.checkpoint._write_group = _blocking_write_group

if SIGNAL_AT:
    import streamnn.run.trainer

    _rank, _step, _name = SIGNAL_AT.split(":")
    _step_before_signal = streamnn.run.trainer.Trainer._train_step

    def _signalling_train_step(self, X, Y):
        if self.comm.rank == int(_rank) and self.step == int(_step):
            os.kill(os.getpid(), getattr(signal, "SIG" + _name))
        return _step_before_signal(self, X, Y)

    streamnn.run.trainer.Trainer._train_step = _signalling_train_step
