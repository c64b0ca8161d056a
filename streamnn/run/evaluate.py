"""Evaluation of a model on a store split, streamed: loss, accuracy, per-class metrics, errors.

An unshuffled loader feeds batches, :class:`streamnn.run.metrics.Metrics` keeps running sums,
and at most ``max_errors`` misclassified images are kept for the ``--errors`` grid. The
trainer's per-epoch evaluation and ``streamnn-eval`` both go through :func:`evaluate_batches`
and the checkpoint's preprocessing (:mod:`streamnn.run.predict`), so their numbers agree
exactly with ``streamnn-predict``'s.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamnn.data.transforms import Preprocess
from streamnn.dist import AgreedError, Comm, SingleComm, agreed
from streamnn.errors import StreamnnError
from streamnn.paths import path_text
from streamnn.run.metrics import Metrics
from streamnn.run.predict import Predictor, load_predictor, predict_proba


class EvaluationStopped(Exception):
    """Raised by :func:`evaluate_batches` when its ``stop()`` callback returns true."""


@dataclass
class Misclassified:
    """Up to ``limit`` misclassified images, kept while streaming."""

    limit: int
    images: list[np.ndarray] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    total: int = 0


def evaluate_batches(model: Any, prep: Preprocess, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                     n_classes: int, *, tta: bool = False, errors: Misclassified | None = None,
                     class_names: Sequence[str] | None = None, image_shape: Sequence[int] | None = None,
                     stop: Callable[[], bool] | None = None) -> Metrics:
    """Stream (X normalized, Y) batches through the model; ``stop()`` true raises EvaluationStopped.

    With ``errors``, the first misclassified images (rows counted in batch order) are kept.
    """
    metrics, seen = Metrics(n_classes), 0
    for X, Y in batches:
        if stop is not None and stop():
            raise EvaluationStopped("evaluation interrupted")
        P = predict_proba(model, prep, X, tta)
        predicted = metrics.update(P, Y)
        if errors is not None:
            _keep_errors(errors, X, Y, P, predicted, seen, class_names, image_shape or prep.image_shape)
        seen += X.shape[1]
    return metrics


def evaluate_split(model: Any, prep: Preprocess, store_path: str | os.PathLike, split: str, n_classes: int, *,
                   batch_size: int, comm: Comm, subset: Any = None, **kwargs: Any) -> Metrics:
    """:func:`evaluate_batches` (``kwargs``) over ``split`` of a store (its rows ``subset``), unshuffled;
    each of the ``comm``'s ranks evaluates its interleaved share of every batch and the sums are reduced."""
    from streamnn.data.loader import Loader
    from streamnn.data.store import checked_batches

    loader = Loader(store_path, split, batch_size=batch_size, shuffle=False, one_hot=n_classes > 2, subset=subset,
                    rank=comm.rank, world_size=comm.size)
    try:
        metrics = evaluate_batches(model, prep, checked_batches(loader, store_path, split), n_classes, **kwargs)
    finally:
        loader.close()
    metrics.reduce(comm)
    return metrics


def _keep_errors(errors: Misclassified, X: np.ndarray, Y: np.ndarray, P: np.ndarray, predicted: np.ndarray,
                 offset: int, class_names: Sequence[str] | None, image_shape: Sequence[int]) -> None:
    from streamnn.run.metrics import class_probabilities, true_labels

    labels = true_labels(Y)
    wrong = np.flatnonzero(labels != predicted)
    errors.total += len(wrong)
    probs = class_probabilities(P)
    names = class_names or [str(i) for i in range(probs.shape[0])]
    for j in wrong[: max(0, errors.limit - len(errors.images))]:
        img = np.clip(np.rint(X[:, j] * 255.0), 0, 255).astype(np.uint8).reshape(image_shape)
        errors.images.append(img)
        errors.rows.append(offset + int(j))
        errors.titles.append(f"{names[labels[j]]}->{names[predicted[j]]} {probs[predicted[j], j]:.2f}")


def evaluate_checkpoint(checkpoint: str | os.PathLike, store_path: str | os.PathLike, split: str = "test", *,
                        tta: bool = False, batch_size: int = 256, max_errors: int = 0,
                        comm: Comm | None = None) -> tuple[dict, Misclassified]:
    """Evaluate a checkpoint on ``split`` of a store; returns (summary dict, misclassified images).

    With a ``comm`` of K > 1 ranks (:mod:`streamnn.dist`) each rank evaluates its interleaved
    share of every batch and the sums are reduced: every rank returns the one-process numbers
    (the loss up to the rounding of its sum); misclassified images need one process.
    """
    comm = comm or SingleComm()
    if max_errors and comm.size > 1:
        raise AgreedError("the grid of misclassified images needs one process: run it without mpiexec")
    pred, same_store = agreed(comm, lambda: _checked_predictor(checkpoint, store_path, split))
    errors = Misclassified(max_errors)
    metrics = evaluate_split(pred.model, pred.prep, store_path, split, pred.n_classes, batch_size=batch_size,
                             comm=comm, tta=tta, errors=errors if max_errors else None, class_names=pred.class_names)
    if not np.isfinite(metrics.loss):
        raise AgreedError(f"evaluation of split {split!r} gave a non-finite loss ({metrics.loss}): the model "
                          "overflows on these images", path_text(checkpoint))
    if errors.rows:
        from streamnn.data.store import open_store

        with open_store(store_path) as store:
            names = store.paths_at(split, errors.rows)
        for i, name in enumerate(names):
            errors.titles[i] = f"{name.rsplit('/', 1)[-1]}\n{errors.titles[i]}"
    summary = metrics.summary(pred.class_names)
    summary.update(checkpoint=path_text(checkpoint), store=path_text(store_path), split=split, tta="flip" if tta else None,
                   same_store_as_training=same_store, misclassified=errors.total if max_errors else None,
                   channel_order=pred.channel_order)
    return summary, errors


def _checked_predictor(checkpoint: str | os.PathLike, store_path: str | os.PathLike,
                       split: str) -> tuple[Predictor, bool]:
    """The checkpoint's predictor, checked against the store's classes, images and split; same store?"""
    from streamnn.data.store import open_store

    pred = load_predictor(checkpoint)
    with open_store(store_path) as store:
        if list(store.class_names) != pred.class_names or tuple(store.image_shape) != pred.image_shape:
            raise StreamnnError(f"store has classes {store.class_names} and images {store.image_shape}, the "
                                f"checkpoint {pred.class_names} and {pred.image_shape}", path_text(store_path))
        if store.n_rows(split) == 0:  # an unknown split is a clear error too
            raise StreamnnError(f"split {split!r} is empty: nothing to evaluate", path_text(store_path))
        return pred, store.fingerprint == pred.fingerprint
