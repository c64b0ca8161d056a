"""Resumable training: the :class:`Trainer` behind ``streamnn-train``.

:class:`Trainer` builds a model, optimizer, schedule and training loader from a configuration
(:mod:`streamnn.run.config`) and runs the epoch loop: each step forward, backward, one
allreduce of the gradients (:mod:`streamnn.dist`; the identity with one process), the
optimizer update and a line in ``steps.csv``; each epoch end the evaluations, the
checkpoints (:mod:`streamnn.run.state`), ``metrics.csv`` and ``curves.png``. A checkpoint
holds the complete, time-free state, so a run interrupted anywhere (:mod:`streamnn.run.stop`)
and resumed ends bit-identical to an uninterrupted one. Only rank 0 writes
(:mod:`streamnn.run.writer`) and speaks (:mod:`streamnn.run.console`).
The design (steps, stops, mid-epoch checkpoints, data-parallel ranks) is in docs/training.md.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamnn.data.store import checked_batches
from streamnn.data.transforms import Preprocess
from streamnn.dist import AgreedError, Comm, SingleComm, agree, agreed, part
from streamnn.errors import StreamnnError
from streamnn.paths import path_text
from streamnn.run.checkpoint import digest, load_checkpoint, save_checkpoint
from streamnn.run.config import LATER_KEYS, RESUMABLE, build_model, derive_seed, resolve_config, run_settings
from streamnn.run.console import Console
from streamnn.run.evaluate import EvaluationStopped, evaluate_split, store_identity
from streamnn.run.folder import BEST, CONFIG_FORMAT, HISTORY_COLUMNS, LATEST, RunDir
from streamnn.run.metrics import Metrics
from streamnn.run.predict import model_dtype
from streamnn.run.selection import early_stopped, selection_split, split_validation
from streamnn.run.state import RunData, read_config, read_data, restore, run_content
from streamnn.run.stop import AgreedStop, StopAgreement, TrainingInterrupted, agreed_signal
from streamnn.run.writer import writer_for
from streamnn.nn.ema import averaged, with_average
from streamnn.threads import use_threads
from streamnn.version import __version__

__all__ = ["Components", "Trainer"]


@dataclass
class Components:
    """Everything a checkpoint restores, built together so that loading can swap them at once."""

    model: Any
    optimizer: Any
    schedule: Callable[[float], float]
    loader: Any
    train_metrics: Metrics


class Trainer:
    """Trains one configuration into ``out_dir``; see the module docstring and docs/training.md.

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
        self.console = Console(verbose and self.comm.rank == 0, echo, progress)  # rank 0 speaks and writes
        self.say = self.console.say
        self.writer = writer_for(self.comm.rank, self.run, self.say)
        if not config.get("store"):
            raise StreamnnError("the configuration needs a 'store' path")
        with open_store(config["store"]) as store:
            self.config = resolve_config(config, store)
            self.threads = run_settings(self.config)  # BLAS threads: a setting of this process, not saved
            self.fingerprint = store.fingerprint
            self.store_identity = store_identity(config["store"], store.fingerprint)  # evaluation reads this file
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
        self.resumed: str | None = None  # digest of the checkpoint this run was restored from
        self.stops = StopAgreement(self.comm, self.say)
        self._speed: float | None = None
        self.parts = self._build()

    # -- building and state ----------------------------------------------------------------------
    def _build(self) -> Components:
        from streamnn.data.loader import Loader
        from streamnn.optim.optimizers import make_optimizer
        from streamnn.optim.schedules import make_schedule

        cfg = self.config
        model = build_model(cfg, self.n_features, self.n_classes, self.image_shape)
        optimizer = with_average(make_optimizer(cfg["optimizer"], model, cfg["lr"], **cfg["optimizer_params"]), cfg.get("ema", 0))
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

    model = property(lambda self: self.parts.model)
    optimizer = property(lambda self: self.parts.optimizer)
    loader = property(lambda self: self.parts.loader)

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
        self.history, self.resumed = history, digest(content)

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
        config = {**LATER_KEYS, **read_config(load_checkpoint(path), path)}  # keys newer than the run: as it ran
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
        self.stops.request(signum)

    def fit(self, on_step: Callable[[Trainer], None] | None = None) -> dict[str, list[float]]:
        """Train until ``epochs`` epochs are done; returns the metrics history. First the ranks agree that
        they run the same configuration on the same store, from the same checkpoint (else AgreedError)."""
        agree(self.comm, "training", {**{k: v for k, v in self.config.items() if k != "store"},
                                      "store fingerprint": self.fingerprint, "resumed checkpoint": self.resumed})
        if self.epoch >= self.config["epochs"]:
            self.say(f"nothing to do: all {self.config['epochs']} epochs are done (resume with a larger "
                     "--epochs to train longer)")
            return self.history
        config_text = json.dumps({"format": CONFIG_FORMAT, **self.config, "streamnn_version": __version__},
                                 indent=2, sort_keys=True) + "\n"
        with contextlib.ExitStack() as stack:  # rank 0 takes the lock; a refusal is every rank's error
            agreed(self.comm, lambda: stack.enter_context(self.writer.session(self.step, config_text, self.history)))
            stack.enter_context(self.stops.signal_handlers())
            self._share_parameters()
            self.say(use_threads(self.threads, world_size=self.comm.size, loader=True, model=self.model))
            self.console.selection(self.config, self.selection, len(self.val_rows) if self.val_rows is not None else 0,
                                   self.epoch, self.epoch_step, self.step)
            self.say(f"reading the store with {self.parts.loader.reader_mode} (--reader {self.config['reader']})")
            while self.epoch < self.config["epochs"] and not early_stopped(self):
                self._run_epoch(on_step)
        return self.history

    def _run_epoch(self, on_step: Callable[[Trainer], None] | None) -> None:
        cfg, parts = self.config, self.parts
        n_steps = len(parts.loader)
        if self.epoch_step == 0:
            parts.optimizer.lr = float(parts.schedule(self.epoch))
            parts.train_metrics.reset()
        started, samples = time.perf_counter(), 0
        with self.console.progressbar(n_steps, self.epoch, cfg["epochs"], self.epoch_step) as bar:
            if self.epoch_step < n_steps:
                for X, Y in checked_batches(parts.loader, cfg["store"], cfg["train_split"]):
                    step = self._train_step(X, Y)
                    samples += step.m
                    if on_step is not None:
                        on_step(self)
                    stop = self._finish_step(step)
                    if bar is not None:
                        bar.update(1, (parts.train_metrics.loss, samples / max(time.perf_counter() - started, 1e-9)))
                    # a checkpoint never holds a loader parked at an epoch's end: a stop at the last step
                    # waits for the epoch end (the state is then "all steps done, epoch end pending")
                    if self.epoch_step < n_steps:
                        if stop is not None:
                            self._interrupt(stop)
                        if cfg["checkpoint_every"] and self.step % cfg["checkpoint_every"] == 0:
                            self._checkpoint(LATEST)
            if self.epoch_step != n_steps:
                raise StreamnnError(f"the loader gave {self.epoch_step} batches, expected {n_steps}")
        self._speed = samples / max(time.perf_counter() - started, 1e-9) if samples else None
        stop = self.stops.agreed()
        if stop is not None:
            self._interrupt(stop)
        try:
            row = self._epoch_end()
        except AgreedStop as s:
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
        stats = np.concatenate([[step.loss_sum], step.metrics.sums(), self.stops.flags()])
        self.comm.allreduce(stats)
        self.parts.train_metrics.add_sums(stats[1:-2])
        loss = self.parts.model.mean_loss(stats[0], step.m) + step.l2
        self.writer.log_step(self.step, self.epoch + 1, loss)
        if not math.isfinite(loss):
            raise AgreedError(f"training diverged: loss is {loss} at step {self.step} (try a smaller --lr); "
                              f"{LATEST} keeps the last good state")
        return agreed_signal(stats[-2:])

    def evaluate_split(self, which: str) -> Metrics:
        """Streaming evaluation of the current model on "val" or "eval" (stops on a stop request)."""
        cfg = self.config
        split, subset = (cfg["train_split"], self.val_rows) if which == "val" else (cfg["eval_split"], None)
        stopping: list[int] = []

        def stop() -> bool:
            agreed = self.stops.agreed()
            stopping.extend([agreed] if agreed is not None else [])
            return bool(stopping)

        try:
            with averaged(self.optimizer):  # --ema: the weight average is evaluated
                return evaluate_split(self.model, self.preprocess(), cfg["store"], split, self.n_classes, stop=stop,
                                      batch_size=cfg["eval_batch_size"], comm=self.comm, subset=subset,
                                      identity=self.store_identity)
        except EvaluationStopped:
            raise AgreedStop(stopping[0]) from None

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
        self.console.epoch_line(self.config, row, seconds, self._speed)

    def _checkpoint(self, *names: str) -> None:
        """Gather the optimizer state (each rank updated its slice), then rank 0 writes ``names``."""
        for buf in self.parts.optimizer.flat_state:
            self.comm.allgather(buf)
        for name in names:
            with averaged(self.optimizer) if name == BEST else contextlib.nullcontext():  # --ema: best = average
                self.writer.checkpoint(name, self.state)

    def _draw_curves(self, final: bool) -> None:
        self.writer.curves(self.history, self.config["eval_split"] or "eval", final)

    def _interrupt(self, signum: int) -> None:
        """Every rank stops at this step (they agreed on it); rank 0 saves."""
        self._checkpoint(LATEST)
        if self.history["epoch"]:
            self._draw_curves(final=True)
        raise TrainingInterrupted(signum, self.out / LATEST, self.epoch, self.step)

@dataclass
class _Step:
    """One step's numbers on this rank, before the ranks agree on them."""
    m: int            # rows of the global batch (the means divide by it)
    loss_sum: float   # this rank's summed cross-entropy (model dtype, held exactly in a float)
    l2: float         # the L2 term lambd/(2m) sum ||W||^2, before the update
    metrics: Metrics  # this rank's rows of the batch
