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
from streamnn.dist import AgreedError, Comm, SingleComm, agree, agreed, canonical_digest
from streamnn.data.remote import is_url
from streamnn.errors import StreamnnError
from streamnn.paths import path_text
from streamnn.run.metrics import Metrics
from streamnn.run.predict import Predictor, load_model, predict_proba
from streamnn.threads import use_threads


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


def store_identity(path: str | os.PathLike, fingerprint: str) -> tuple[Any, ...]:
    """What identifies a store file on this machine: its content fingerprint and the file's
    device, inode, size and modification time (a repack or an overwrite changes them); for a
    URL, the remote object's size, ETag and Last-Modified."""
    if is_url(path):
        from streamnn.data.remote import open_object
        return (fingerprint, *open_object(str(path)).version)
    st = os.stat(path)
    return fingerprint, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _check_identity(store_path: str | os.PathLike, fingerprint: str, identity: tuple[Any, ...] | None) -> None:
    if identity is not None and store_identity(store_path, fingerprint) != tuple(identity):
        raise StreamnnError("the store was replaced or changed during this run (its file or fingerprint is not "
                            "the one training started on): refusing to evaluate another store; resume the run "
                            "once the store stays as it is", path_text(store_path))


def evaluate_split(model: Any, prep: Preprocess, store_path: str | os.PathLike, split: str, n_classes: int, *,
                   batch_size: int, comm: Comm, subset: Any = None, identity: tuple[Any, ...] | None = None,
                   **kwargs: Any) -> Metrics:
    """:func:`evaluate_batches` (``kwargs``) over ``split`` of a store (its rows ``subset``), unshuffled;
    each of the ``comm``'s ranks evaluates its interleaved share of every batch and the sums are reduced.

    ``identity`` (:func:`store_identity`, a training run's store): the store at ``store_path`` must
    still be that file with that fingerprint, when evaluation opens it and when it is done; else
    every rank raises one error (the numbers would be another store's)."""
    from streamnn.data.loader import Loader
    from streamnn.data.store import checked_batches

    def opened() -> Any:
        made = Loader(store_path, split, batch_size=batch_size, shuffle=False, one_hot=n_classes > 2,
                      subset=subset, rank=comm.rank, world_size=comm.size)
        try:
            _check_identity(store_path, made.fingerprint, identity)
        except BaseException:
            made.close()
            raise
        return made

    loader = agreed(comm, opened)
    try:
        metrics = evaluate_batches(model, prep, checked_batches(loader, store_path, split), n_classes, **kwargs)
    finally:
        loader.close()
    agreed(comm, lambda: _check_identity(store_path, loader.fingerprint, identity))
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
                        comm: Comm | None = None, threads: Any = None) -> tuple[dict, Misclassified]:
    """Evaluate a checkpoint on ``split`` of a store; returns (summary dict, misclassified images).
    ``threads`` (``"auto"`` or a number; None leaves them as they are) are set as
    :func:`streamnn.threads.use_threads` gives them for the checkpoint's model.

    With a ``comm`` of K > 1 ranks (:mod:`streamnn.dist`) each rank evaluates its interleaved
    share of every batch and the sums are reduced: every rank returns the one-process numbers
    (the loss up to the rounding of its sum); misclassified images need one process.
    """
    comm = comm or SingleComm()

    def checked() -> tuple[Predictor, str]:
        if max_errors and comm.size > 1:
            raise StreamnnError("the grid of misclassified images needs one process: run it without mpiexec")
        return _checked_predictor(checkpoint, store_path, split)

    pred, fingerprint = agreed(comm, checked)
    if threads is not None:
        use_threads(threads, world_size=comm.size, model=pred.model)
    same_store = fingerprint == pred.fingerprint
    # every rank evaluates the same checkpoint on the same store and split, alike, or none does
    agree(comm, "evaluation", {"checkpoint": _model_digest(pred), "store fingerprint": fingerprint, "split": split,
                               "tta": tta, "batch_size": batch_size})
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


def _model_digest(pred: Predictor) -> str:
    """A digest of what a checkpoint computes: its parameters, preprocessing, classes and store."""
    params = getattr(pred.model, "flat_params", None)
    return canonical_digest([params, pred.prep.mean, pred.prep.std, pred.class_names, list(pred.image_shape),
                             pred.fingerprint, type(pred.model).__name__])


def _checked_predictor(checkpoint: str | os.PathLike, store_path: str | os.PathLike,
                       split: str) -> tuple[Predictor, str]:
    """The checkpoint's predictor, checked against the store's classes, images and split; the
    store's fingerprint."""
    from streamnn.data.store import open_store

    pred = load_model(checkpoint)
    with open_store(store_path) as store:
        if list(store.class_names) != pred.class_names or tuple(store.image_shape) != pred.image_shape:
            raise StreamnnError(f"store has classes {store.class_names} and images {store.image_shape}, the "
                                f"checkpoint {pred.class_names} and {pred.image_shape}", path_text(store_path))
        if store.n_rows(split) == 0:  # an unknown split is a clear error too
            raise StreamnnError(f"split {split!r} is empty: nothing to evaluate", path_text(store_path))
        return pred, store.fingerprint
