"""The checkpoint layout of a training run: written and read here only.

A run's checkpoint (a :mod:`streamnn.run.checkpoint` file) holds this content::

    config          JSON of the run configuration (:func:`streamnn.run.config.resolve_config`)
    model/config    JSON of the model's ``config()`` (rebuilds it with ``models.from_config``)
    model/state     the model's ``state_dict()``: parameter arrays and the dropout generator
    optimizer/      name, lr, state (moments and step count)
    schedule/       config (JSON), lr
    loader/         the training loader's state (epoch, position, seed)
    progress/       epoch, epoch_step, step, best, best_epoch, selection, train_metrics
    history/        one float64 array per metrics column, one value per finished epoch
    data/           what inference needs from the store: fingerprint, class_names,
                    image_shape (H, W, C), channel_order, options (JSON of the packing
                    options), standardize, and mean / std (D,) when standardize

Reading validates before anything is allocated from it: every entry is checked against its
type, shape and range (a list of class names that are strings, three positive image sizes,
finite mean and std of shape (D,), finite model parameters), and the model configuration is
checked against the parameter arrays stored next to it and against the memory available
(:mod:`streamnn.run.budget`), so a file rebuilt by hand gets a one-line error naming it and the
entry, never a MemoryError or a traceback. The digest check of :mod:`streamnn.run.checkpoint`
comes first and catches corruption.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamnn.run.checkpoint import get, load_checkpoint
from streamnn.errors import StreamnnError
from streamnn.paths import path_text

CHANNEL_ORDERS = ("BGR", "RGB", "GRAY")


@dataclass
class RunData:
    """What a run records about its store, for inference: see ``data/`` in the module docstring."""

    fingerprint: str
    class_names: list[str]
    image_shape: tuple[int, int, int]
    channel_order: str
    options: dict[str, Any]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return int(np.prod(self.image_shape))


def run_content(*, config: Mapping[str, Any], model: Any, optimizer: Any, optimizer_name: str, schedule: Any,
                loader: Any, train_metrics: Any, progress: Mapping[str, Any],
                history: Mapping[str, list[float]], data: RunData) -> dict[str, Any]:
    """The checkpoint content of a run's state (see the module docstring)."""
    stored: dict[str, Any] = {
        "fingerprint": data.fingerprint, "class_names": list(data.class_names),
        "image_shape": np.array(data.image_shape, np.int64), "channel_order": data.channel_order,
        "options": json.dumps(data.options, sort_keys=True), "standardize": data.mean is not None,
    }
    if data.mean is not None:
        stored.update(mean=np.asarray(data.mean, np.float64), std=np.asarray(data.std, np.float64))
    schedule_cfg = schedule.config() if hasattr(schedule, "config") else {"name": config["lr_schedule"]}
    return {
        "config": json.dumps(dict(config), sort_keys=True),
        "model": {"config": json.dumps(model.config(), sort_keys=True), "state": model.state_dict()},
        "optimizer": {"name": optimizer_name, "lr": float(optimizer.lr), "state": optimizer.state_dict()},
        "schedule": {"config": json.dumps(schedule_cfg, sort_keys=True), "lr": float(optimizer.lr)},
        "loader": loader.state_dict(),
        "progress": {**progress, "train_metrics": train_metrics.state_dict()},
        "history": {c: np.array(v, np.float64) for c, v in history.items()},
        "data": stored,
    }


# -- reading ----------------------------------------------------------------------------------------
def _where(path: str | os.PathLike | None) -> str | None:
    """The file name as messages print it."""
    return None if path is None else path_text(path)


def _json(content: Mapping[str, Any], dotted: str, path: str | None, kind: type = dict) -> Any:
    text = get(content, dotted, path)
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        value = None
    if not isinstance(value, kind):
        raise StreamnnError(f"checkpoint entry {dotted!r} is not a JSON {kind.__name__}", path)
    return value


def read_config(content: Mapping[str, Any], path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The run configuration saved in a checkpoint."""
    return _json(content, "config", _where(path))


def load_run_config(path: str | os.PathLike) -> dict[str, Any]:
    """The run configuration of checkpoint file ``path`` (verified)."""
    return read_config(load_checkpoint(path), path)


def read_data(content: Mapping[str, Any], path: str | os.PathLike | None = None) -> RunData:
    """The validated ``data/`` entries of a checkpoint."""
    path = _where(path)
    data = get(content, "data", path)

    def bad(entry: str, must: str) -> StreamnnError:
        return StreamnnError(f"checkpoint entry 'data.{entry}' must be {must}", path)

    if not isinstance(data, Mapping):
        raise bad("", "a group")
    names = data.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or len(set(names)) != len(names):
        raise bad("class_names", "a list of at least two distinct names")
    shape = data.get("image_shape")
    if (not isinstance(shape, np.ndarray) or shape.shape != (3,) or shape.dtype.kind not in "iu"
            or not (shape > 0).all() or int(np.prod(shape.astype(object))) > 1 << 31):
        raise bad("image_shape", "three positive integers (H, W, C)")
    image_shape = tuple(int(s) for s in shape)
    channel_order = data.get("channel_order", "BGR")
    if channel_order not in CHANNEL_ORDERS:
        raise bad("channel_order", f"one of {', '.join(CHANNEL_ORDERS)}")
    fingerprint = data.get("fingerprint")
    if not isinstance(fingerprint, str):
        raise bad("fingerprint", "a string")
    try:
        options = json.loads(data.get("options", "{}"))
    except (TypeError, ValueError):
        options = None
    if not isinstance(options, dict):
        raise bad("options", "a JSON object")
    standardize = data.get("standardize", False)
    if not isinstance(standardize, bool):
        raise bad("standardize", "true or false")
    run = RunData(fingerprint, list(names), image_shape, channel_order, options)  # type: ignore[arg-type]
    if standardize:
        for key in ("mean", "std"):
            arr = data.get(key)
            if (not isinstance(arr, np.ndarray) or arr.shape != (run.n_features,) or arr.dtype.kind != "f"
                    or not np.isfinite(arr).all() or (key == "std" and (arr < 0).any())):
                raise bad(key, f"finite floats of shape ({run.n_features},)" + (", >= 0" if key == "std" else ""))
        run.mean, run.std = data["mean"], data["std"]
    return run


def read_model(content: Mapping[str, Any], path: str | os.PathLike | None = None) -> Any:
    """The model of a checkpoint: configuration checked against the stored arrays and the memory
    available before anything is allocated, parameters checked finite, then built and loaded."""
    from streamnn.nn import models
    from streamnn.run import budget

    path = _where(path)
    config = _json(content, "model.config", path)
    state = get(content, "model.state", path)
    if not isinstance(state, Mapping):
        raise StreamnnError("checkpoint entry 'model.state' must be a group", path)
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    try:
        expected = budget.parameter_count(config)
    except StreamnnError as exc:
        raise StreamnnError(f"checkpoint model config: {exc}", path) from None
    stored = sum(int(a.size) for a in arrays.values())
    if expected is not None:
        if expected > stored:  # the state holds every parameter (and layer statistics besides)
            raise StreamnnError(f"checkpoint model config asks for {expected:,} parameters but the file "
                                f"holds {stored:,} values (edited or not written by streamnn)", path)
        itemsize = 8 if config.get("dtype") == "float64" else 4
        budget.check_fits(expected, itemsize, budget.INFERENCE_COPIES, "the checkpoint's model")
    for name, arr in arrays.items():
        if arr.dtype.kind not in "f" or not np.isfinite(arr).all():
            raise StreamnnError(f"checkpoint model parameter {name!r} holds non-finite values (NaN or inf): "
                                "the model is unusable", path)
    try:
        model = models.from_config(config)
        model.load_state_dict(dict(state))
    except StreamnnError as exc:
        raise StreamnnError(f"checkpoint model: {exc}", path) from None
    except MemoryError:  # a model type whose size budget cannot tell in advance
        raise StreamnnError("checkpoint model does not fit in memory", path) from None
    return model


def restore(content: Mapping[str, Any], path: str | os.PathLike, *, model: Any, optimizer: Any,
            optimizer_name: str, loader: Any, train_metrics: Any, steps_per_epoch: int,
            history_columns: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Load a checkpoint's states into freshly built components; returns (progress, history).

    The caller has checked the store fingerprint; here the architecture, optimizer, every
    state and the progress counters are checked (a mismatch raises StreamnnError)."""
    path = _where(path)  # type: ignore[assignment]
    saved_model = _json(content, "model.config", path)
    if saved_model != json.loads(json.dumps(model.config())):
        raise StreamnnError(f"checkpoint holds another architecture: {_short(saved_model)} "
                            f"vs this run's {_short(model.config())}", path)
    saved_optimizer = get(content, "optimizer.name", path)
    if saved_optimizer != optimizer_name:
        raise StreamnnError(f"checkpoint optimizer is {saved_optimizer!r}, this run uses {optimizer_name!r}", path)
    model.load_state_dict(dict(get(content, "model.state", path)))
    optimizer.load_state_dict(dict(get(content, "optimizer.state", path)))
    optimizer.lr = float(get(content, "optimizer.lr", path))
    loader.load_state_dict(get(content, "loader", path))
    progress = get(content, "progress", path)
    if not isinstance(progress, Mapping):
        raise StreamnnError("checkpoint entry 'progress' must be a group", path)
    progress = dict(progress)
    check_progress(progress, path)
    train_metrics.load_state_dict(progress["train_metrics"])
    history = read_history(get(content, "history", path), history_columns, progress["epoch"], path)
    if progress["epoch_step"] > steps_per_epoch:
        raise StreamnnError(f"checkpoint is at step {progress['epoch_step']} of an epoch that has "
                            f"{steps_per_epoch} steps here", path)
    return progress, history


def check_progress(progress: dict[str, Any], path: str | None) -> None:
    """The progress counters in range: integers >= 0, the step count at least the epoch's, the best
    epoch done, and ``best`` an accuracy (0..1), or -inf before the first selection."""
    for key in ("epoch", "epoch_step", "step", "best_epoch"):
        value = progress.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
            raise StreamnnError(f"checkpoint entry 'progress.{key}' must be an integer >= 0", path)
    if progress["best_epoch"] > progress["epoch"] or progress["epoch_step"] > progress["step"]:
        raise StreamnnError("checkpoint entries 'progress.*' contradict each other (best epoch after the last "
                            "epoch, or more steps in the epoch than in the run)", path)
    best = progress.get("best")
    if isinstance(best, bool) or not isinstance(best, (int, float)) or not (
            0.0 <= best <= 1.0 or (best == -math.inf and progress["best_epoch"] == 0)):
        raise StreamnnError(f"checkpoint entry 'progress.best' must be an accuracy in [0, 1] (or -inf before "
                            f"the first epoch), not {best!r}", path)
    progress["best"] = float(best)


#: The range of each metrics column: (low, high) inclusive; NaN allowed (a column not measured).
_HISTORY_RANGES = {"accuracy": (0.0, 1.0), "loss": (0.0, math.inf), "lr": (0.0, math.inf), "best": (0.0, 1.0)}


def read_history(saved: Any, columns: tuple[str, ...], epochs: int, path: str | None) -> dict[str, list[float]]:
    """The metrics history: one value per finished epoch in every column, each in its range (epoch
    numbers 1, 2, ..., steps increasing integers, accuracies in [0, 1], losses >= 0, a finite
    learning rate > 0, best in [0, 1]; NaN where a column was not measured)."""
    if not isinstance(saved, Mapping):
        raise StreamnnError("checkpoint entry 'history' must be a group", path)
    history: dict[str, list[float]] = {}
    for column in columns:
        arr = saved.get(column)
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iuf" or arr.shape != (epochs,):
            raise StreamnnError(f"checkpoint entry 'history.{column}' must hold one number per finished epoch "
                                f"({epochs})", path)
        values = arr.astype(np.float64)
        if column == "epoch":
            ok = np.array_equal(values, np.arange(1, epochs + 1))
        elif column == "step":
            ok = bool(np.isfinite(values).all() and (values == np.round(values)).all() and (values > 0).all()
                      and (np.diff(values) >= 0).all())
        else:
            low, high = _HISTORY_RANGES[column.rsplit("_", 1)[-1]]
            ok = bool(((values >= low) & (values <= high) | np.isnan(values)).all())
            ok = ok and (column != "lr" or bool(((values > 0) & np.isfinite(values)).all()))
        if not ok:
            raise StreamnnError(f"checkpoint entry 'history.{column}' holds values out of range", path)
        history[column] = [float(v) for v in values]
    return history


def _short(model_config: Mapping[str, Any]) -> str:
    keys = ("type", "neuron_cnt", "n_features", "activation_func", "conv", "hidden", "dtype")
    picked = {k: model_config[k] for k in keys if k in model_config} or dict(model_config)
    return json.dumps(picked, sort_keys=True)[:200]
