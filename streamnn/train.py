"""Resumable training: the :class:`Trainer` behind ``streamnn-train``.

Design. A run is a *configuration* (a JSON-able dict, :func:`resolve_config`) plus an output
folder. :class:`Trainer` builds from the configuration a model, an optimizer, a learning-rate
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
included). A checkpoint (:mod:`streamnn.checkpoint`) holds the whole state: model parameters
and dropout generator, optimizer moments and step, schedule config and current rate, loader
state (epoch, position, seed: the order is a function of them), the epoch's running train
metrics (loss and accuracy accumulate over the epoch's batches, in train mode), the metrics
history and best accuracy, the configuration, the store's fingerprint, and what inference
needs (packing options, class names, image shape, channel order, standardization mean/std).
It holds no wall-clock time, so a run interrupted anywhere and resumed ends bit-identical
to an uninterrupted one: parameters, optimizer state, ``checkpoint-latest.h5``,
``metrics.csv`` and ``steps.csv``. Times are only printed.

While :meth:`Trainer.fit` runs it holds an exclusive lock on the folder (:func:`run_lock`),
so two trainers never write into one folder.

Loading (:meth:`Trainer.load`) reads and verifies the file, checks store fingerprint and
architecture, builds *new* model, optimizer and loader objects and loads their states; only
when every check passed does it swap them in, so a bad checkpoint leaves the trainer as it was.
"""
from __future__ import annotations

import contextlib
import csv
import io
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

from . import __version__
from .atomic import atomic_output
from .checkpoint import get, load_checkpoint, save_checkpoint
from .errors import StreamnnError
from .evaluate import EvaluationStopped, Preprocess, evaluate_batches, model_dtype
from .metrics import Metrics

LATEST, BEST = "checkpoint-latest.h5", "checkpoint-best.h5"
METRICS_CSV, STEPS_CSV, CURVES_PNG, CONFIG_JSON = "metrics.csv", "steps.csv", "curves.png", "config.json"
RUN_FILES = (LATEST, BEST, METRICS_CSV, STEPS_CSV, CURVES_PNG, CONFIG_JSON)
LOCK_FILE = ".streamnn-train.lock"  # holds the pid of the run using the folder
MODELS = ("logistic", "mlp")
OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
SCHEDULES = ("constant", "hyperbolic", "step", "exponential", "cosine")
DTYPES = ("float32", "float64")
HISTORY_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                   "eval_loss", "eval_accuracy", "best")

DEFAULTS: dict[str, Any] = {
    "store": None,               # path of the HDF5 store
    "train_split": "train",
    "eval_split": "auto",        # "auto": "test" when the store has it; None: no evaluation split
    "model": "mlp",
    "hidden": [128, 32],
    "activation": "relu",
    "optimizer": "adam",
    "optimizer_params": {},      # e.g. {"beta1": 0.9} for adam, {"beta": 0.9} for momentum (streamnn.optim)
    "lr": 1e-3,
    "lr_schedule": "constant",
    "schedule_params": {},       # e.g. {"decay": 1.0} for hyperbolic (streamnn.schedules)
    "epochs": 10,
    "batch_size": 64,
    "eval_batch_size": 256,
    "weight_decay": 0.0,
    "dropout": 0.0,
    "standardize": False,
    "augment": None,             # None | "flip"
    "val_fraction": 0.0,         # seeded, stratified part of the training split used for selection
    "dtype": "float32",
    "seed": 0,
    "order": "exact",            # loader shuffle order: "exact" | "block"
    "reader": "auto",            # loader I/O: "auto" | "mmap" | "pread" (streamnn.rowreader; may change on resume)
    "checkpoint_every": 0,       # steps; 0: only at epoch ends
}
# Schedule parameters (see streamnn.schedules) filled in when not given.
SCHEDULE_DEFAULTS: dict[str, dict[str, float]] = {
    "hyperbolic": {"decay": 1.0}, "step": {"every": 10.0}, "exponential": {"factor": 0.95}}
RESUMABLE = ("epochs", "reader")  # options that may change when a run is resumed
CURVES_SECONDS = 5.0             # curves.png is redrawn at most this often (and at the last epoch)


class TrainingInterrupted(Exception):
    """Raised by :meth:`Trainer.fit` after saving a checkpoint because of SIGINT or SIGTERM."""

    def __init__(self, signum: int, checkpoint: Path, epoch: int, step: int) -> None:
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped at step {step} (epoch {epoch + 1}); state saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        """128 + signal number, as shells report a death by that signal (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


class _Stop(Exception):
    """Internal: a stop request seen during the epoch-end evaluation."""


# -- configuration -----------------------------------------------------------------------------
@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder ``out`` (created if needed): a second trainer
    in the same folder fails at once instead of interleaving checkpoints. POSIX ``flock``, so
    the lock dies with its process; where ``fcntl`` does not exist, nothing is locked.
    """
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(out / LOCK_FILE, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            raise StreamnnError("another training run is using this folder"
                                + (f" (pid {holder})" if holder.isdigit() else ""), out) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)


def derive_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for one purpose ("model", "loader", "split") of a run's seed."""
    words = [int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF] + [ord(ch) for ch in purpose]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> np.uint64(1))


def resolve_config(user: dict[str, Any], store: Any) -> dict[str, Any]:
    """Complete and validate a configuration against an open store; raises StreamnnError."""
    unknown = set(user) - set(DEFAULTS)
    if unknown:
        raise StreamnnError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    cfg = {**DEFAULTS, **{k: v for k, v in user.items()}}
    cfg["store"] = os.path.abspath(cfg["store"] if cfg["store"] is not None else store.path)

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise StreamnnError(message)

    for key, choices in (("model", MODELS), ("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES),
                         ("dtype", DTYPES), ("order", ("exact", "block")), ("augment", (None, "flip")),
                         ("reader", ("auto", "mmap", "pread"))):
        need(cfg[key] in choices, f"{key.replace('_', '-')} must be one of "
                                  f"{', '.join(str(c) for c in choices)}, not {cfg[key]!r}")
    cfg["hidden"] = [int(h) for h in (cfg["hidden"] or [])]
    need(all(h > 0 for h in cfg["hidden"]), f"hidden layer sizes must be positive: {cfg['hidden']}")
    if cfg["model"] == "logistic":
        cfg["hidden"], cfg["activation"], cfg["dropout"] = [], None, 0.0
    for key in ("epochs", "batch_size", "eval_batch_size"):
        cfg[key] = int(cfg[key])
        need(cfg[key] > 0, f"{key.replace('_', '-')} must be positive, not {cfg[key]}")
    cfg["checkpoint_every"] = int(cfg["checkpoint_every"] or 0)
    need(cfg["checkpoint_every"] >= 0, "checkpoint-every must be >= 0 (0: epoch ends only)")
    for key in ("lr", "weight_decay", "dropout", "val_fraction"):
        cfg[key] = float(cfg[key])
    need(cfg["lr"] > 0 and math.isfinite(cfg["lr"]), f"lr must be a positive number, not {cfg['lr']}")
    need(cfg["weight_decay"] >= 0, "weight-decay must be >= 0")
    need(0 <= cfg["dropout"] < 1, "dropout must be in [0, 1)")
    need(0 <= cfg["val_fraction"] < 1, "val-fraction must be in [0, 1)")
    cfg["seed"] = int(cfg["seed"])
    cfg["standardize"] = bool(cfg["standardize"])
    cfg["optimizer_params"] = dict(cfg["optimizer_params"] or {})
    cfg["schedule_params"] = {**SCHEDULE_DEFAULTS.get(cfg["lr_schedule"], {}), **(cfg["schedule_params"] or {})}
    if cfg["lr_schedule"] == "cosine":  # fix the period now: extending a run must not change past rates
        cfg["schedule_params"].setdefault("total_epochs", cfg["epochs"])
    from .schedules import make_schedule

    cfg["schedule_params"] = make_schedule(cfg["lr_schedule"], cfg["lr"], **cfg["schedule_params"]).params
    need(cfg["train_split"] in store.splits, f"the store has no {cfg['train_split']!r} split "
                                             f"(it has {', '.join(store.splits)})")
    if cfg["eval_split"] == "auto":
        cfg["eval_split"] = "test" if "test" in store.splits else None
    if cfg["eval_split"] in ("none", ""):
        cfg["eval_split"] = None
    need(cfg["eval_split"] is None or cfg["eval_split"] in store.splits,
         f"the store has no {cfg['eval_split']!r} split to evaluate on (it has {', '.join(store.splits)}; "
         f"use --eval-split none to skip)")
    need(cfg["eval_split"] != cfg["train_split"], "the evaluation split must differ from the training split")
    if cfg["standardize"]:
        need(store.stats() is not None, "the store has no /stats (mean, std): repack it, or train without "
                                        "--standardize")
    if cfg["model"] == "logistic":
        need(store.n_classes == 2, f"logistic regression is binary but the store has {store.n_classes} "
                                   "classes: use --model mlp")
    need(store.n_classes >= 2, "the store needs at least two classes")
    return cfg


def selection_split(cfg: dict[str, Any]) -> str:
    """Which accuracy selects checkpoint-best.h5: "val", "eval" or "train"."""
    return "val" if cfg["val_fraction"] > 0 else "eval" if cfg["eval_split"] else "train"


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of row indices into (train, val), each sorted."""
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "split")))
    val = []
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        n_val = int(round(fraction * len(rows)))
        val.append(rng.permutation(rows)[:n_val])
    val_rows = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    train_rows = np.setdiff1d(np.arange(len(labels)), val_rows)
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise StreamnnError(f"val-fraction {fraction} leaves {len(train_rows)} training and {len(val_rows)} "
                            "validation rows")
    return train_rows.astype(np.int64), val_rows.astype(np.int64)


# -- components --------------------------------------------------------------------------------
def build_model(cfg: dict[str, Any], n_features: int, n_classes: int) -> Any:
    """A fresh model for the configuration (binary: one sigmoid output; else softmax)."""
    from . import models

    dtype, seed = np.dtype(cfg["dtype"]).type, derive_seed(cfg["seed"], "model")
    if cfg["model"] == "logistic":
        return models.LogisticRegression(n_features, dtype=dtype, weight_decay=cfg["weight_decay"], seed=seed)
    sizes = [n_features, *cfg["hidden"], 1 if n_classes == 2 else n_classes]
    activations = [cfg["activation"]] * len(cfg["hidden"]) + ["sigmoid" if n_classes == 2 else "softmax"]
    return models.DeepNetwork(sizes, activations, dtype=dtype, weight_decay=cfg["weight_decay"],
                              dropout=cfg["dropout"], seed=seed)


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
                 echo: Callable[[str], None] | None = None, progress: bool | None = None) -> None:
        from .store import open_store

        self.out = Path(out_dir)
        self.verbose = verbose
        self._echo = echo or (lambda msg: print(msg, flush=True))
        self.progress = verbose and (sys.stderr.isatty() if progress is None else progress)
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
        self.train_rows, self.val_rows = (split_validation(labels, cfg["val_fraction"], cfg["seed"])
                                          if cfg["val_fraction"] > 0 else (None, None))
        self.n_train = len(self.train_rows) if self.train_rows is not None else len(labels)
        self.epoch = 0          # completed epochs
        self.epoch_step = 0     # steps done in the current epoch
        self.step = 0           # steps done in the run
        self.best = -math.inf   # best selection accuracy so far
        self.best_epoch = 0
        self.history: dict[str, list[float]] = {c: [] for c in HISTORY_COLUMNS}
        self._stop: int | None = None
        self._steps_file: io.TextIOBase | None = None
        self._curves_drawn: float | None = None
        self._speed: float | None = None
        self.parts = self._build()

    # -- building and state ----------------------------------------------------------------------
    def _build(self) -> Components:
        from .loader import Loader
        from .optim import make_optimizer
        from .schedules import make_schedule

        cfg = self.config
        model = build_model(cfg, self.n_features, self.n_classes)
        optimizer = make_optimizer(cfg["optimizer"], model, cfg["lr"], **cfg["optimizer_params"])
        schedule = make_schedule(cfg["lr_schedule"], cfg["lr"], **cfg["schedule_params"])
        loader = Loader(cfg["store"], cfg["train_split"], batch_size=cfg["batch_size"], shuffle=True,
                        seed=derive_seed(cfg["seed"], "loader"), standardize=cfg["standardize"],
                        augment=cfg["augment"], one_hot=self.n_classes > 2, order=cfg["order"],
                        subset=self.train_rows, reader=cfg["reader"])
        return Components(model, optimizer, schedule, loader, Metrics(self.n_classes))

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

    def state(self) -> dict[str, Any]:
        """The checkpoint content: the complete, time-free state of the run."""
        p = self.parts
        data: dict[str, Any] = {
            "fingerprint": self.fingerprint, "class_names": self.class_names,
            "image_shape": np.array(self.image_shape, np.int64), "channel_order": self.channel_order,
            "options": json.dumps(self.packing_options, sort_keys=True), "standardize": self.mean is not None,
        }
        if self.mean is not None:
            data.update(mean=np.asarray(self.mean, np.float64), std=np.asarray(self.std, np.float64))
        schedule_cfg = p.schedule.config() if hasattr(p.schedule, "config") else {"name": self.config["lr_schedule"]}
        return {
            "config": json.dumps(self.config, sort_keys=True),
            "model": {"config": json.dumps(p.model.config(), sort_keys=True), "state": p.model.state_dict()},
            "optimizer": {"name": self.config["optimizer"], "lr": float(p.optimizer.lr),
                          "state": p.optimizer.state_dict()},
            "schedule": {"config": json.dumps(schedule_cfg, sort_keys=True), "lr": float(p.optimizer.lr)},
            "loader": p.loader.state_dict(),
            "progress": {"epoch": self.epoch, "epoch_step": self.epoch_step, "step": self.step,
                         "best": self.best, "best_epoch": self.best_epoch, "selection": self.selection,
                         "train_metrics": p.train_metrics.state_dict()},
            "history": {c: np.array(v, np.float64) for c, v in self.history.items()},
            "data": data,
        }

    def save(self, path: str | os.PathLike) -> str:
        """Write the state to ``path`` atomically; returns the content digest."""
        return save_checkpoint(path, self.state())

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint of this run; on any error raise StreamnnError and change nothing."""
        content = load_checkpoint(path)
        try:
            parts, progress, history = self._restore(content, path)
        except StreamnnError as exc:
            if str(path) in str(exc):
                raise
            raise StreamnnError(str(exc), path) from None
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise StreamnnError(f"checkpoint does not fit this run ({exc.__class__.__name__}: "
                                f"{' '.join(str(exc).split())[:160]})", path) from None
        old, self.parts = self.parts, parts
        with contextlib.suppress(Exception):
            old.loader.close()
        self.epoch, self.epoch_step, self.step = progress["epoch"], progress["epoch_step"], progress["step"]
        self.best, self.best_epoch = progress["best"], progress["best_epoch"]
        self.history = history

    def _restore(self, content: dict[str, Any], path: str | os.PathLike) -> tuple[Components, dict, dict]:
        fp = get(content, "data.fingerprint", path)
        if fp != self.fingerprint:
            raise StreamnnError(f"checkpoint was trained on another store (fingerprint {fp[:12]}..., "
                                f"this store {self.fingerprint[:12]}...)", path)
        parts = self._build()
        try:
            saved_model = json.loads(get(content, "model.config", path))
            if saved_model != json.loads(json.dumps(parts.model.config())):
                raise StreamnnError(f"checkpoint holds another architecture: {_short(saved_model)} "
                                    f"vs this run's {_short(parts.model.config())}", path)
            if get(content, "optimizer.name", path) != self.config["optimizer"]:
                raise StreamnnError(f"checkpoint optimizer is {content['optimizer']['name']!r}, this run uses "
                                    f"{self.config['optimizer']!r}", path)
            parts.model.load_state_dict(get(content, "model.state", path))
            parts.optimizer.load_state_dict(get(content, "optimizer.state", path))
            parts.optimizer.lr = float(get(content, "optimizer.lr", path))
            parts.loader.load_state_dict(get(content, "loader", path))
            progress = dict(get(content, "progress", path))
            parts.train_metrics.load_state_dict(progress["train_metrics"])
            saved_history = get(content, "history", path)
            history = {c: [float(v) for v in np.asarray(saved_history[c])] for c in HISTORY_COLUMNS}
            for key in ("epoch", "epoch_step", "step", "best_epoch"):
                progress[key] = int(progress[key])
            progress["best"] = float(progress["best"])
            if len(history["epoch"]) != progress["epoch"]:
                raise StreamnnError("checkpoint history and progress disagree", path)
            if progress["epoch_step"] > len(parts.loader):
                raise StreamnnError(f"checkpoint is at step {progress['epoch_step']} of an epoch that has "
                                    f"{len(parts.loader)} steps here", path)
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
            raise StreamnnError(f"nothing to resume: no {LATEST} in this folder", out_dir)
        content = load_checkpoint(path)
        config = json.loads(get(content, "config", path))
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
        with run_lock(self.out):
            self._remove_stale_temporaries()
            self._write_config()
            self._open_steps_log()
            if self.history["epoch"]:  # outputs as of the checkpoint (a crash may have left them ahead or behind)
                write_metrics_csv(self.out / METRICS_CSV, self.history)
            try:
                with self._signal_handlers():
                    self._say_selection()
                    self.say(f"reading the store with {self.parts.loader.reader_mode} (--reader {self.config['reader']})")
                    while self.epoch < self.config["epochs"]:
                        self._run_epoch(on_step)
            finally:
                if self._steps_file is not None:
                    self._steps_file.close()
                    self._steps_file = None
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
                for X, Y in parts.loader:
                    self._train_step(X, Y)
                    samples += X.shape[1]
                    if bar is not None:
                        bar.update(1, (parts.train_metrics.loss, samples / max(time.perf_counter() - started, 1e-9)))
                    if on_step is not None:
                        on_step(self)
                    if self.epoch_step < n_steps:  # mid-epoch states only (see the module docstring)
                        if self._stop is not None:
                            self._interrupt()
                        if cfg["checkpoint_every"] and self.step % cfg["checkpoint_every"] == 0:
                            self.save(self.out / LATEST)
            if self.epoch_step != n_steps:
                raise StreamnnError(f"the loader gave {self.epoch_step} batches, expected {n_steps}")
        self._speed = samples / max(time.perf_counter() - started, 1e-9) if samples else None
        if self._stop is not None:
            self._interrupt()
        try:
            row = self._epoch_end()
        except _Stop:
            self._interrupt()
        self._finish_epoch(row, time.perf_counter() - started)

    def _train_step(self, X: np.ndarray, Y: np.ndarray) -> None:
        p = self.parts
        dtype = model_dtype(p.model)
        X, Y = X.astype(dtype, copy=False), Y.astype(dtype, copy=False)
        p.optimizer.zero_grad()
        Y_hat = p.model.forward(X, train_mode=True)
        loss = float(p.model.loss(Y, Y_hat))
        p.model.backward(Y)
        p.optimizer.step()
        p.train_metrics.update(Y_hat, Y)
        self.epoch_step += 1
        self.step += 1
        if self._steps_file is not None:
            self._steps_file.write(f"{self.step},{self.epoch + 1},{loss!r}\n")
            self._steps_file.flush()
        if not math.isfinite(loss):
            raise StreamnnError(f"training diverged: loss is {loss} at step {self.step} (try a smaller --lr); "
                                f"{LATEST} keeps the last good state")

    def evaluate_split(self, which: str) -> Metrics:
        """Streaming evaluation of the current model on "val" or "eval" (stops on a stop request)."""
        from .loader import Loader

        cfg = self.config
        split, subset = (cfg["train_split"], self.val_rows) if which == "val" else (cfg["eval_split"], None)
        loader = Loader(cfg["store"], split, batch_size=cfg["eval_batch_size"], shuffle=False,
                        one_hot=self.n_classes > 2, subset=subset)
        try:
            return evaluate_batches(self.model, self.preprocess(), loader, self.n_classes,
                                    stop=lambda: self._stop is not None)
        except EvaluationStopped:
            raise _Stop() from None
        finally:
            loader.close()

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
        improved = row["best"] == 1.0
        if improved:
            self.best, self.best_epoch = row[f"{self.selection}_accuracy"], self.epoch
        if improved:
            self.save(self.out / BEST)
        self.save(self.out / LATEST)
        write_metrics_csv(self.out / METRICS_CSV, self.history)
        self._draw_curves(final=self.epoch >= self.config["epochs"])
        self.say(self._epoch_line(row, seconds))

    def _draw_curves(self, final: bool) -> None:
        """curves.png at the first and last epoch, and between them at most every CURVES_SECONDS."""
        now = time.monotonic()
        if not final and self._curves_drawn is not None and now - self._curves_drawn < CURVES_SECONDS:
            return
        self._curves_drawn = now
        try:
            from .plots import save_curves  # lazily: matplotlib is only needed here

            save_curves(self.history, self.out / CURVES_PNG, eval_name=self.config["eval_split"] or "eval")
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not stop training
            self.say(f"warning: could not draw {CURVES_PNG} ({exc.__class__.__name__}: {exc})")

    def _interrupt(self) -> None:
        assert self._stop is not None
        path = self.out / LATEST
        self.save(path)
        if self.history["epoch"]:
            self._draw_curves(final=True)
        raise TrainingInterrupted(self._stop, path, self.epoch, self.step)

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

    def _remove_stale_temporaries(self) -> None:
        """Temporary files a killed run left behind (never a complete output)."""
        from .atomic import TMP_PREFIX

        for tmp in self.out.glob(TMP_PREFIX + "*"):
            if any(tmp.name.startswith(f"{TMP_PREFIX}{name}.") for name in RUN_FILES):
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    self.say(f"removed {tmp.name}, left by an interrupted write")

    def _write_config(self) -> None:
        with atomic_output(self.out / CONFIG_JSON) as tmp:
            tmp.write_text(json.dumps({**self.config, "streamnn_version": __version__}, indent=2,
                                      sort_keys=True) + "\n")

    def _open_steps_log(self) -> None:
        """Open steps.csv for appending, cut back to the current step (drops rows a resume redoes)."""
        path = self.out / STEPS_CSV
        keep = ["step,epoch,loss\n"]
        if self.step and path.is_file():
            for line in path.read_text().splitlines(keepends=True)[1:]:
                fields = line.rstrip("\n").split(",")
                if not line.endswith("\n") or len(fields) != 3 or not fields[0].isdigit():
                    break
                if int(fields[0]) > self.step:
                    break
                keep.append(line)
        with atomic_output(path) as tmp:
            tmp.write_text("".join(keep))
        self._steps_file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in fit()

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


def _short(model_config: dict[str, Any]) -> str:
    keys = ("type", "neuron_cnt", "n_features", "activation_func", "dtype")
    picked = {k: model_config[k] for k in keys if k in model_config} or model_config
    return json.dumps(picked, sort_keys=True)[:200]


# -- files ------------------------------------------------------------------------------------------
def write_metrics_csv(path: str | os.PathLike, history: dict[str, list[float]]) -> None:
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
    with atomic_output(path) as tmp:
        tmp.write_text(buf.getvalue())


def read_metrics_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """metrics.csv as a list of row dicts (strings)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

