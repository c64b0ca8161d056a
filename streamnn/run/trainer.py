"""Resumable training: the :class:`Trainer` behind ``streamnn-train``.

Design. A run is a *configuration* (a JSON-able dict, :func:`streamnn.run.config.resolve_config`)
plus an output folder. :class:`Trainer` builds from the configuration a model, an optimizer, a learning-rate
schedule and loaders (the training loader shuffles; validation and evaluation loaders do
not), then runs the epoch loop:

    epoch start: learning rate = schedule(epoch), a pure function of the epoch number.
    each step:   forward (train mode) -> loss -> backward -> optimizer step; the step's loss
                 is appended to ``steps.csv``; every ``checkpoint_every`` steps, and whenever a
                 stop was requested (SIGINT / SIGTERM set a flag; it is checked between steps),
                 ``checkpoint-latest.h5`` is written.
    epoch end:   streaming evaluation on the validation part and on the evaluation split;
                 ``checkpoint-best.h5`` when the selection accuracy improved (validation part,
                 else evaluation split, else training), ``checkpoint-latest.h5``, one row in
                 ``metrics.csv``, ``curves.png``.

Mid-epoch checkpoints are only taken before an epoch's last step; a stop requested at or
after the last step is honoured once the loader has finished the epoch (the saved state is
then "all steps done, epoch end pending"), so a checkpoint never holds a loader parked at
the end of an epoch.

Every output is written atomically (:mod:`streamnn.atomic`), except ``steps.csv`` which is
an append-only log: on resume it is cut back to the checkpoint's step (a torn last line
included). A checkpoint (:mod:`streamnn.run.checkpoint`) holds the whole state: model parameters
and dropout generator, optimizer moments and step, schedule config and current rate, loader
state (epoch, position, seed: the order is a function of them), the epoch's running train
metrics (loss and accuracy accumulate over the epoch's batches, in train mode), the metrics
history and best accuracy, the configuration, the store's fingerprint, and what inference
needs (packing options, class names, image shape, channel order, standardization mean/std).
It holds no wall-clock time, so a run interrupted anywhere and resumed ends bit-identical
to an uninterrupted one: parameters, optimizer state, ``checkpoint-latest.h5``,
``metrics.csv`` and ``steps.csv``. Times are only printed.

While :meth:`Trainer.fit` runs it holds an exclusive lock on the folder (:mod:`streamnn.run.folder`),
so two trainers never write into one folder.

Data-parallel (``comm``, :mod:`streamnn.dist`). With K ranks every rank holds the whole model
and runs this same loop on its interleaved share of each global batch (:mod:`streamnn.data.order`):

    step:        forward of the share, dropout drawn for the global batch (``share``) ->
                 backward with the global count m (``dZ = (A - Y) / m``, no L2 yet) ->
                 one allreduce of ``model.flat_grads`` -> on this rank's slice of the flat
                 buffer (``dist.part``) ``+= lambd/m W`` and the optimizer update -> an
                 allgather of the parameters (the elementwise update is split over the ranks
                 instead of repeated on each; the optimizer's moments are gathered before a
                 checkpoint); then one small allreduce of the step's numbers (loss sum,
                 train-metric sums) and of the ranks' stop flags.
    stops:       a signal only sets this rank's flag; the ranks act on the *agreed* flags at the
                 same points (after a step, at epoch end, before each evaluation batch), so all
                 stop at one step and raise TrainingInterrupted together.
    epoch end:   each rank evaluates its share, the metric sums are reduced; the ranks compare
                 a digest of their parameters (an error if they differ).

Only rank 0 writes (:mod:`streamnn.run.writer`: lock, CSVs, curves, checkpoints); its
checkpoint is the one-process format, with the loader position as samples consumed, so a run
resumes on any K. fit() starts by broadcasting rank 0's parameters (new or restored). With one
process every collective is the identity and the numbers are those of the one-process loop.

Loading (:meth:`Trainer.load`) reads and verifies the file, checks store fingerprint and
architecture, builds *new* model, optimizer and loader objects and loads their states; only
when every check passed does it swap them in, so a bad checkpoint leaves the trainer as it was.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamnn.version import __version__
from streamnn.run.checkpoint import load_checkpoint, save_checkpoint
from streamnn.dist import AgreedError, Comm, SingleComm, agreed, part
from streamnn.errors import StreamnnError
from streamnn.run.evaluate import EvaluationStopped, Preprocess, evaluate_batches, model_dtype
from streamnn.run.metrics import Metrics
from streamnn.paths import path_text
from streamnn.run.config import RESUMABLE, build_model, derive_seed, resolve_config, selection_split, split_validation
from streamnn.run.folder import (BEST, CONFIG_FORMAT, CONFIG_JSON, CURVES_METADATA, CURVES_PNG, HISTORY_COLUMNS, LATEST,
                     LOCK_FILE, METRICS_CSV, RUN_FILES, STEPS_CSV, RunDir, run_lock)
from streamnn.run.state import RunData, read_config, read_data, restore, run_content
from streamnn.run.writer import read_metrics_csv, write_metrics_csv, writer_for  # noqa: F401 - public here too
from streamnn.data.store import checked_batches

__all__ = ["BEST", "LATEST", "LOCK_FILE", "METRICS_CSV", "RUN_FILES", "STEPS_CSV", "Trainer", "TrainingInterrupted",
           "resolve_config", "run_lock"]

class TrainingInterrupted(Exception):
    """Raised by :meth:`Trainer.fit` after saving a checkpoint because of SIGINT or SIGTERM."""

    def __init__(self, signum: int, checkpoint: Path, epoch: int, step: int) -> None:
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped at step {step} (epoch {epoch + 1}); state saved to {path_text(checkpoint)}")

    @property
    def exit_code(self) -> int:
        """128 + signal number, as shells report a death by that signal (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


class _Stop(Exception):
    """Internal: a stop agreed on during the epoch-end evaluation."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class Components:
    """Everything a checkpoint restores, built together so that loading can swap them at once."""

    model: Any
    optimizer: Any
    schedule: Callable[[float], float]
    loader: Any
    train_metrics: Metrics


class Trainer:
    """Trains one configuration into ``out_dir``; see the module docstring.

    ``Trainer(cfg, out_dir)`` starts a new run; :meth:`resume` continues one. :meth:`fit`
    returns the history, or raises :class:`TrainingInterrupted` after saving on a signal.
    """

    def __init__(self, config: dict[str, Any], out_dir: str | os.PathLike, *, verbose: bool = True,
                 echo: Callable[[str], None] | None = None, progress: bool | None = None,
                 comm: Comm | None = None) -> None:
        from streamnn.data.store import open_store

        self.comm = comm or SingleComm()
        self.out = Path(out_dir)
        self.run = RunDir(self.out)
        self.verbose = verbose and self.comm.rank == 0  # rank 0 speaks and writes for the run
        self._echo = echo or (lambda msg: print(msg, flush=True))
        self.progress = self.verbose and (sys.stderr.isatty() if progress is None else progress)
        self.writer = writer_for(self.comm.rank, self.run, self.say)
        if not config.get("store"):
            raise StreamnnError("the configuration needs a 'store' path")
        with open_store(config["store"]) as store:
            self.config = resolve_config(config, store)
            self.fingerprint = store.fingerprint
            self.class_names = list(store.class_names)
            self.image_shape = tuple(store.image_shape)
            self.n_features = int(store.n_features)
            self.channel_order = store.channel_order
            self.packing_options = dict(store.options)
            stats = store.stats()
            self.mean, self.std = (stats if self.config["standardize"] and stats is not None else (None, None))
            labels = store.labels(self.config["train_split"])
        self.n_classes = len(self.class_names)
        cfg = self.config
        if self.comm.size > 1 and cfg["model"] == "cnn" and cfg["batch_norm"]:
            raise AgreedError("--batch-norm is not data-parallel here (each rank would normalize its share with "
                              "its own statistics, unlike one process): train it without mpiexec")
        self.train_rows, self.val_rows = (split_validation(labels, cfg["val_fraction"], cfg["seed"])
                                          if cfg["val_fraction"] > 0 else (None, None))
        self.n_train = len(self.train_rows) if self.train_rows is not None else len(labels)
        if self.n_train == 0:
            raise StreamnnError(f"split {cfg['train_split']!r} is empty: nothing to train on",
                                path_text(cfg["store"]))
        self.epoch = 0          # completed epochs
        self.epoch_step = 0     # steps done in the current epoch
        self.step = 0           # steps done in the run
        self.best = -math.inf   # best selection accuracy so far
        self.best_epoch = 0
        self.history: dict[str, list[float]] = {c: [] for c in HISTORY_COLUMNS}
        self._stop: int | None = None  # a signal this rank received (the ranks agree before acting on it)
        self._speed: float | None = None
        self.parts = self._build()

    # -- building and state ----------------------------------------------------------------------
    def _build(self) -> Components:
        from streamnn.data.loader import Loader
        from streamnn.optim.optimizers import make_optimizer
        from streamnn.optim.schedules import make_schedule

        cfg = self.config
        model = build_model(cfg, self.n_features, self.n_classes, self.image_shape)
        optimizer = make_optimizer(cfg["optimizer"], model, cfg["lr"], **cfg["optimizer_params"])
        schedule = make_schedule(cfg["lr_schedule"], cfg["lr"], **cfg["schedule_params"])
        loader = Loader(cfg["store"], cfg["train_split"], batch_size=cfg["batch_size"], shuffle=True,
                        seed=derive_seed(cfg["seed"], "loader"), standardize=cfg["standardize"],
                        augment=cfg["augment"], one_hot=self.n_classes > 2, order=cfg["order"],
                        subset=self.train_rows, shift=cfg["shift"], shift_padding=cfg["shift_padding"],
                        reader=cfg["reader"], rank=self.comm.rank, world_size=self.comm.size)
        return Components(model, optimizer, schedule, loader, Metrics(self.n_classes))

    def _share_parameters(self) -> None:
        """Every rank starts from rank 0's parameters (as Horovod broadcasts at start and after a restore)."""
        self.comm.broadcast(self.parts.model.flat_params)

    def ranks_digest(self) -> str:
        """SHA-256 of the parameters; raises AgreedError unless every rank holds bit-identical ones."""
        digest = hashlib.sha256(self.parts.model.flat_params.tobytes()).digest()
        differs = np.array([digest != self.comm.broadcast_bytes(digest)], np.int64)
        self.comm.allreduce(differs)
        if differs[0]:
            raise AgreedError(f"the ranks' parameters differ at step {self.step} (a rank computed differently)")
        return digest.hex()

    @property
    def model(self) -> Any:
        return self.parts.model

    @property
    def optimizer(self) -> Any:
        return self.parts.optimizer

    @property
    def loader(self) -> Any:
        return self.parts.loader

    @property
    def selection(self) -> str:
        return selection_split(self.config)

    def preprocess(self) -> Preprocess:
        """Inference preprocessing (standardization as in training) for this run's model."""
        return Preprocess(self.image_shape, self.mean, self.std, dtype=model_dtype(self.model))

    def run_data(self) -> RunData:
        """What this run records about its store, for inference."""
        return RunData(self.fingerprint, self.class_names, self.image_shape, self.channel_order,  # type: ignore[arg-type]
                       self.packing_options, self.mean, self.std)

    def state(self) -> dict[str, Any]:
        """The checkpoint content: the complete, time-free state of the run (:mod:`streamnn.run.state`)."""
        p = self.parts
        progress = {"epoch": self.epoch, "epoch_step": self.epoch_step, "step": self.step, "best": self.best,
                    "best_epoch": self.best_epoch, "selection": self.selection}
        return run_content(config=self.config, model=p.model, optimizer=p.optimizer,
                           optimizer_name=self.config["optimizer"], schedule=p.schedule, loader=p.loader,
                           train_metrics=p.train_metrics, progress=progress, history=self.history,
                           data=self.run_data())

    def save(self, path: str | os.PathLike) -> str:
        """Write the state to ``path`` atomically; returns the content digest."""
        return save_checkpoint(path, self.state())

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint of this run; on any error raise StreamnnError and change nothing."""
        content = load_checkpoint(path)
        where = path_text(path)
        try:
            parts, progress, history = self._restore(content, path)
        except StreamnnError as exc:
            if where in str(exc):
                raise
            raise StreamnnError(str(exc), where) from None
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise StreamnnError(f"checkpoint does not fit this run ({exc.__class__.__name__}: "
                                f"{' '.join(str(exc).split())[:160]})", where) from None
        old, self.parts = self.parts, parts
        with contextlib.suppress(Exception):
            old.loader.close()
        self.epoch, self.epoch_step, self.step = progress["epoch"], progress["epoch_step"], progress["step"]
        self.best, self.best_epoch = progress["best"], progress["best_epoch"]
        self.history = history

    def _restore(self, content: dict[str, Any], path: str | os.PathLike) -> tuple[Components, dict, dict]:
        fp = self.run_data().fingerprint
        saved = read_data(content, path)
        if saved.fingerprint != fp:
            raise StreamnnError(f"checkpoint was trained on another store (fingerprint {saved.fingerprint[:12]}..., "
                                f"this store {fp[:12]}...)", path_text(path))
        parts = self._build()
        try:
            progress, history = restore(content, path, model=parts.model, optimizer=parts.optimizer,
                                        optimizer_name=self.config["optimizer"], loader=parts.loader,
                                        train_metrics=parts.train_metrics, steps_per_epoch=len(parts.loader),
                                        history_columns=HISTORY_COLUMNS)
        except BaseException:
            with contextlib.suppress(Exception):
                parts.loader.close()
            raise
        return parts, progress, history

    @classmethod
    def resume(cls, out_dir: str | os.PathLike, *, store: str | os.PathLike | None = None,
               changes: dict[str, Any] | None = None, **kwargs: Any) -> Trainer:
        """Continue the run in ``out_dir`` from its latest checkpoint, with the saved configuration.

        ``store`` may point to the same store moved elsewhere (checked by fingerprint);
        ``changes`` may only hold keys in RESUMABLE (``epochs``: extend or shorten the run; ``reader``).
        """
        path = Path(out_dir) / LATEST
        if not path.is_file():
            raise StreamnnError(f"nothing to resume: no {LATEST} in this folder", path_text(out_dir))
        config = read_config(load_checkpoint(path), path)
        for key, value in (changes or {}).items():
            if key not in RESUMABLE:
                raise StreamnnError(f"{key} cannot change when resuming (only {', '.join(RESUMABLE)} can)")
            config[key] = value
        if store is not None:
            config["store"] = str(store)
        trainer = cls(config, out_dir, **kwargs)
        trainer.load(path)
        return trainer

    def close(self) -> None:
        """Release the training loader (its file handle and prefetch thread)."""
        with contextlib.suppress(Exception):
            self.parts.loader.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ----------------------------------------------------------------------------------
    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Ask :meth:`fit` to save and stop after the current step (what the signal handler does)."""
        self._stop = signum

    def fit(self, on_step: Callable[[Trainer], None] | None = None) -> dict[str, list[float]]:
        """Train until ``epochs`` epochs are done; returns the metrics history."""
        if self.epoch >= self.config["epochs"]:
            self.say(f"nothing to do: all {self.config['epochs']} epochs are done (resume with a larger "
                     "--epochs to train longer)")
            return self.history
        config_text = json.dumps({"format": CONFIG_FORMAT, **self.config, "streamnn_version": __version__},
                                 indent=2, sort_keys=True) + "\n"
        with contextlib.ExitStack() as stack:  # rank 0 takes the lock; a refusal is every rank's error
            agreed(self.comm, lambda: stack.enter_context(self.writer.session(self.step, config_text, self.history)))
            stack.enter_context(self._signal_handlers())
            self._share_parameters()
            self._say_selection()
            self.say(f"reading the store with {self.parts.loader.reader_mode} (--reader {self.config['reader']})")
            while self.epoch < self.config["epochs"]:
                self._run_epoch(on_step)
        return self.history

    def _run_epoch(self, on_step: Callable[[Trainer], None] | None) -> None:
        cfg, parts = self.config, self.parts
        n_steps = len(parts.loader)
        if self.epoch_step == 0:
            parts.optimizer.lr = float(parts.schedule(self.epoch))
            parts.train_metrics.reset()
        started, samples = time.perf_counter(), 0
        with self._progressbar(n_steps) as bar:
            if self.epoch_step < n_steps:
                for X, Y in checked_batches(parts.loader, cfg["store"], cfg["train_split"]):
                    step = self._train_step(X, Y)
                    samples += step.m
                    if on_step is not None:
                        on_step(self)
                    stop = self._finish_step(step)
                    if bar is not None:
                        bar.update(1, (parts.train_metrics.loss, samples / max(time.perf_counter() - started, 1e-9)))
                    if self.epoch_step < n_steps:  # mid-epoch states only (see the module docstring)
                        if stop is not None:
                            self._interrupt(stop)
                        if cfg["checkpoint_every"] and self.step % cfg["checkpoint_every"] == 0:
                            self._checkpoint(LATEST)
            if self.epoch_step != n_steps:
                raise StreamnnError(f"the loader gave {self.epoch_step} batches, expected {n_steps}")
        self._speed = samples / max(time.perf_counter() - started, 1e-9) if samples else None
        stop = self._agreed_stop()
        if stop is not None:
            self._interrupt(stop)
        try:
            row = self._epoch_end()
        except _Stop as s:
            self._interrupt(s.signum)
        self._finish_epoch(row, time.perf_counter() - started)

    def _train_step(self, X: np.ndarray, Y: np.ndarray) -> _Step:
        """Forward and backward on this rank's rows of global batch ``epoch_step``, the gradients
        summed over the ranks (one allreduce of the flat buffer), the optimizer step."""
        p, comm = self.parts, self.comm
        m = p.loader.global_batch_size(self.epoch_step)
        dtype = model_dtype(p.model)
        X, Y = X.astype(dtype, copy=False), Y.astype(dtype, copy=False)
        p.optimizer.zero_grad()
        Y_hat = p.model.forward(X, train_mode=True, share=(comm.rank, comm.size, m))
        step = _Step(m, float(p.model.loss_sum(Y)), p.model.l2_cost(m), Metrics(self.n_classes))
        p.model.backward(Y, count=m, decay=False)
        comm.allreduce(p.model.flat_grads)
        mine = part(p.model.flat_params.size, comm.rank, comm.size)  # the slice this rank updates
        p.model.add_weight_decay(m, mine)
        p.optimizer.step(mine)
        comm.allgather(p.model.flat_params)
        step.metrics.update(Y_hat, Y)
        self.epoch_step += 1
        self.step += 1
        return step

    def _finish_step(self, step: _Step) -> int | None:
        """Agree on the step's numbers and on stopping (one small allreduce); log it; the agreed stop."""
        stats = np.concatenate([[step.loss_sum], step.metrics.sums(), self._stop_flags()])
        self.comm.allreduce(stats)
        self.parts.train_metrics.add_sums(stats[1:-2])
        loss = self.parts.model.mean_loss(stats[0], step.m) + step.l2
        self.writer.log_step(self.step, self.epoch + 1, loss)
        if not math.isfinite(loss):
            raise AgreedError(f"training diverged: loss is {loss} at step {self.step} (try a smaller --lr); "
                              f"{LATEST} keeps the last good state")
        return _agreed_signal(stats[-2:])

    def _stop_flags(self) -> np.ndarray:
        return np.array([self._stop == signal.SIGINT, self._stop == signal.SIGTERM], np.float64)

    def _agreed_stop(self) -> int | None:
        """The stop every rank agrees on now (a collective: all ranks call it at the same point)."""
        flags = self._stop_flags()
        self.comm.allreduce(flags)
        return _agreed_signal(flags)

    def evaluate_split(self, which: str) -> Metrics:
        """Streaming evaluation of the current model on "val" or "eval" (stops on a stop request)."""
        from streamnn.data.loader import Loader

        cfg = self.config
        split, subset = (cfg["train_split"], self.val_rows) if which == "val" else (cfg["eval_split"], None)
        loader = Loader(cfg["store"], split, batch_size=cfg["eval_batch_size"], shuffle=False,
                        one_hot=self.n_classes > 2, subset=subset, rank=self.comm.rank, world_size=self.comm.size)
        stopping: list[int] = []

        def stop() -> bool:
            agreed = self._agreed_stop()
            stopping.extend([agreed] if agreed is not None else [])
            return bool(stopping)

        try:
            metrics = evaluate_batches(self.model, self.preprocess(), checked_batches(loader, cfg["store"], split),
                                       self.n_classes, stop=stop)
        except EvaluationStopped:
            raise _Stop(stopping[0]) from None
        finally:
            loader.close()
        metrics.reduce(self.comm)
        return metrics

    def _epoch_end(self) -> dict[str, float]:
        cfg, train = self.config, self.parts.train_metrics
        row = {c: math.nan for c in HISTORY_COLUMNS}
        row.update(epoch=self.epoch + 1, step=self.step, lr=float(self.parts.optimizer.lr),
                   train_loss=train.loss, train_accuracy=train.accuracy, best=0.0)
        if self.val_rows is not None:
            m = self.evaluate_split("val")
            row.update(val_loss=m.loss, val_accuracy=m.accuracy)
        if cfg["eval_split"]:
            m = self.evaluate_split("eval")
            row.update(eval_loss=m.loss, eval_accuracy=m.accuracy)
        score = row[f"{self.selection}_accuracy"]
        if score > self.best:
            row["best"] = 1.0
        return row

    def _finish_epoch(self, row: dict[str, float], seconds: float) -> None:
        for c in HISTORY_COLUMNS:
            self.history[c].append(float(row[c]))
        self.epoch += 1
        self.epoch_step = 0
        self.ranks_digest()
        improved = row["best"] == 1.0
        if improved:
            self.best, self.best_epoch = row[f"{self.selection}_accuracy"], self.epoch
        self._checkpoint(*((BEST, LATEST) if improved else (LATEST,)))
        self.writer.metrics(self.history)
        self._draw_curves(final=self.epoch >= self.config["epochs"])
        self.say(self._epoch_line(row, seconds))

    def _checkpoint(self, *names: str) -> None:
        """Gather the optimizer state (each rank updated its slice), then rank 0 writes ``names``."""
        for buf in self.parts.optimizer.flat_state:
            self.comm.allgather(buf)
        for name in names:
            self.writer.checkpoint(name, self.state)

    def _draw_curves(self, final: bool) -> None:
        self.writer.curves(self.history, self.config["eval_split"] or "eval", final)

    def _interrupt(self, signum: int) -> None:
        """Every rank stops at this step (they agreed on it); rank 0 saves."""
        self._checkpoint(LATEST)
        if self.history["epoch"]:
            self._draw_curves(final=True)
        raise TrainingInterrupted(signum, self.out / LATEST, self.epoch, self.step)

    # -- outputs -----------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        if self.verbose:
            self._echo(message)

    def _say_selection(self) -> None:
        cfg = self.config
        what = {"val": f"the validation part ({cfg['val_fraction']:g} of {cfg['train_split']!r}: "
                       f"{len(self.val_rows) if self.val_rows is not None else 0} rows, seeded)",
                "eval": f"the {cfg['eval_split']!r} split (its accuracy is then optimistic: use --val-fraction "
                        "to keep test numbers unbiased)",
                "train": "training accuracy (no validation or evaluation data)"}[self.selection]
        self.say(f"{BEST} is selected on {what}")
        if self.epoch or self.epoch_step:
            self.say(f"resuming at epoch {self.epoch + 1}, step {self.step}")

    def _epoch_line(self, row: dict[str, float], seconds: float) -> str:
        parts = [f"epoch {int(row['epoch'])}/{self.config['epochs']}",
                 f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"]
        if not math.isnan(row["val_accuracy"]):
            parts.append(f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}")
        if not math.isnan(row["eval_accuracy"]):
            parts.append(f"{self.config['eval_split']} loss {row['eval_loss']:.4f} acc {row['eval_accuracy']:.4f}")
        parts += [f"lr {row['lr']:.3g}", f"{seconds:.1f}s"]
        if self._speed:
            parts.append(f"{self._speed:.0f} samples/s")
        return "  ".join(parts) + ("  *best" if row["best"] == 1.0 else "")

    @contextlib.contextmanager
    def _progressbar(self, n_steps: int) -> Iterator[Any]:
        if not self.progress:
            yield None
            return
        import click

        def show(item: Any) -> str:
            return "" if item is None else f"loss {item[0]:.4f}  {item[1]:.0f} samples/s"

        with click.progressbar(length=n_steps, label=f"epoch {self.epoch + 1}/{self.config['epochs']}",
                               item_show_func=show, file=sys.stderr, show_eta=True) as bar:
            if self.epoch_step:
                bar.update(self.epoch_step)
            yield bar

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """SIGINT/SIGTERM: first one sets the stop flag; a second one aborts at once (KeyboardInterrupt)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop is not None:
                raise KeyboardInterrupt
            self._stop = signum
            self.say(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
                     "(send it again to abort without saving)")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


@dataclass
class _Step:
    """One step's numbers on this rank, before the ranks agree on them."""

    m: int            # rows of the global batch (the means divide by it)
    loss_sum: float   # this rank's summed cross-entropy (model dtype, held exactly in a float)
    l2: float         # the L2 term lambd/(2m) sum ||W||^2, before the update
    metrics: Metrics  # this rank's rows of the batch


def _agreed_signal(flags: np.ndarray) -> int | None:
    """From the summed [SIGINT, SIGTERM] flags of the ranks: SIGTERM if any rank had it, else SIGINT."""
    return signal.SIGTERM if flags[1] else signal.SIGINT if flags[0] else None
