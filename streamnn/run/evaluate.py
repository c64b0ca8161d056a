"""Inference: evaluate a checkpoint on a store split, and predict classes of image files.

Design. A checkpoint records everything inference needs (see :mod:`streamnn.run.trainer`): the
model (config and parameters), the class names and image shape, the packing options that
turned a photo into a stored row, and the standardization mean/std when training used it.
:class:`~streamnn.data.transforms.Preprocess` turns normalized rows (values in [0, 1], HWC order,
one column per image) into model inputs: optional horizontal flip, then standardization,
with the functions the training loader uses (:mod:`streamnn.data.transforms`).
The trainer's per-epoch evaluation, ``streamnn-eval`` and ``streamnn-predict`` all go through
it and through :func:`evaluate_batches`, so their numbers agree exactly.

Evaluation streams: an unshuffled loader feeds batches, :class:`streamnn.run.metrics.Metrics`
keeps running sums, and at most ``max_errors`` misclassified images are kept for the
``--errors`` grid. Prediction reads images in small batches with
:func:`streamnn.pack.decode.load_image`, the function packing used; an unreadable file yields an
error entry and the others continue.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamnn.run.checkpoint import load_checkpoint
from streamnn.dist import AgreedError, Comm, SingleComm, agreed
from streamnn.errors import StreamnnError
from streamnn.run.metrics import Metrics
from streamnn.paths import path_text
from streamnn.data.transforms import STD_FLOOR, Preprocess, flip_columns, standardization  # noqa: F401 (re-exported)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Test-time augmentations by name: whether :func:`predict_proba` averages in the mirror image.
TTA: dict[str, bool] = {"none": False, "flip": True}


def model_dtype(model: Any) -> np.dtype:
    """The floating dtype of a model's parameters."""
    return next(iter(model.params.values())).dtype


def predict_proba(model: Any, prep: Preprocess, X: np.ndarray, tta: bool = False) -> np.ndarray:
    """Probabilities (1, B) or (K, B) for normalized columns X; ``tta`` averages with the mirror image."""
    P = model.predict_proba(prep(X))
    if tta:
        P = (P + model.predict_proba(prep(X, flip=True))) / 2
    return P


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


# -- checkpoints ----------------------------------------------------------------------------
@dataclass
class Predictor:
    """A trained model with the preprocessing and metadata its checkpoint recorded."""

    model: Any
    prep: Preprocess
    class_names: list[str]
    image_shape: tuple[int, int, int]
    options: dict[str, Any]
    channel_order: str
    fingerprint: str
    path: Path | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def predictor_from_content(content: dict[str, Any], path: str | os.PathLike | None = None) -> Predictor:
    """Rebuild the model and preprocessing from loaded checkpoint content (validated, see :mod:`streamnn.run.state`)."""
    from streamnn.run.state import read_data, read_model

    where = path_text(path) if path is not None else None
    data = read_data(content, path)
    model = read_model(content, path)
    outputs = getattr(model, "n_classes", None)
    if outputs is not None and outputs != (1 if len(data.class_names) == 2 else len(data.class_names)):
        raise StreamnnError(f"checkpoint model has {outputs} outputs for {len(data.class_names)} classes", where)
    prep = Preprocess(data.image_shape, data.mean, data.std, dtype=model_dtype(model))
    try:  # one image of the recorded shape must go through (a hand-edited shape or model would not)
        model.predict_proba(np.zeros((data.n_features, 1), model_dtype(model)))
    except (ValueError, StreamnnError) as exc:
        raise StreamnnError(f"checkpoint model does not take images of shape {data.image_shape} ({exc})",
                            where) from None
    return Predictor(model, prep, data.class_names, data.image_shape, data.options, data.channel_order,
                     data.fingerprint, Path(path) if path is not None else None)


def load_predictor(path: str | os.PathLike) -> Predictor:
    """Load a checkpoint file for inference (one-line StreamnnError if unusable)."""
    content = load_checkpoint(path)
    where = path_text(path)
    try:
        return predictor_from_content(content, path)
    except StreamnnError as exc:
        if where in str(exc):
            raise
        raise StreamnnError(str(exc), where) from None
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise StreamnnError(f"checkpoint cannot be used for inference ({exc.__class__.__name__}: {exc})",
                            where) from None


def evaluate_checkpoint(checkpoint: str | os.PathLike, store_path: str | os.PathLike, split: str = "test", *,
                        tta: bool = False, batch_size: int = 256, max_errors: int = 0,
                        comm: Comm | None = None) -> tuple[dict, Misclassified]:
    """Evaluate a checkpoint on ``split`` of a store; returns (summary dict, misclassified images).

    With a ``comm`` of K > 1 ranks (:mod:`streamnn.dist`) each rank evaluates its interleaved
    share of every batch and the sums are reduced: every rank returns the one-process numbers
    (the loss up to the rounding of its sum); misclassified images need one process.
    """
    from streamnn.data.loader import Loader
    from streamnn.data.store import checked_batches

    comm = comm or SingleComm()
    if max_errors and comm.size > 1:
        raise AgreedError("the grid of misclassified images needs one process: run it without mpiexec")
    pred, same_store = agreed(comm, lambda: _checked_predictor(checkpoint, store_path, split))
    errors = Misclassified(max_errors)
    loader = Loader(store_path, split, batch_size=batch_size, shuffle=False, one_hot=pred.n_classes > 2,
                    rank=comm.rank, world_size=comm.size)
    try:
        metrics = evaluate_batches(pred.model, pred.prep, checked_batches(loader, store_path, split), pred.n_classes,
                                   tta=tta,
                                   errors=errors if max_errors else None, class_names=pred.class_names)
    finally:
        loader.close()
    metrics.reduce(comm)
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


def iter_image_files(inputs: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files given directly, and image files found (sorted, recursively) under folders given."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                    yield f
        else:
            yield p


def predict_files(pred: Predictor, files: Iterable[Path], *, tta: bool = False,
                  batch_size: int = 64) -> Iterator[tuple[Path, dict[str, Any] | None, str | None]]:
    """For each file: (path, {"class", "probability", "probabilities"}, None) or (path, None, error)."""
    from streamnn.pack.decode import load_image

    def flush(batch: list[tuple[Path, np.ndarray]]) -> Iterator[tuple[Path, dict[str, Any], None]]:
        X = pred.prep.rows_from_images(np.stack([img for _, img in batch]))
        from streamnn.run.metrics import class_probabilities

        probs = class_probabilities(predict_proba(pred.model, pred.prep, X, tta))
        if not np.isfinite(probs).all():
            raise StreamnnError("the model gives non-finite probabilities (NaN or inf): it is unusable",
                                path_text(pred.path) if pred.path is not None else None)
        for (path, _), col in zip(batch, probs.T):
            k = int(np.argmax(col)) if len(col) > 2 else int(col[1] > 0.5)
            yield path, {"class": pred.class_names[k], "probability": float(col[k]),
                         "probabilities": {n: float(p) for n, p in zip(pred.class_names, col)}}, None

    batch: list[tuple[Path, np.ndarray]] = []
    for path in files:
        try:
            img = load_image_as_packed(load_image, path, pred)
        except StreamnnError as exc:
            yield path, None, str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - any decoder failure is reported per file
            yield path, None, (f"{path_text(path)}: cannot read image "
                               f"({exc.__class__.__name__}: {' '.join(str(exc).split())})")
            continue
        batch.append((path, img))
        if len(batch) == batch_size:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


def load_image_as_packed(load_image: Callable[..., np.ndarray], path: Path, pred: Predictor) -> np.ndarray:
    """Decode one file exactly as packing did; uint8 (H, W, C) in the store's channel order."""
    from streamnn.pack.decode import decode_kwargs

    h, w, c = pred.image_shape
    kwargs = {**decode_kwargs(pred.options), "size": (h, w)}
    if "grayscale" not in pred.options:
        kwargs["grayscale"] = pred.channel_order == "GRAY"
    img = np.asarray(load_image(path, **kwargs))
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape != (h, w, c) or img.dtype != np.uint8:
        raise StreamnnError(f"decoded to {img.dtype} {img.shape}, the model expects uint8 {(h, w, c)}",
                            path_text(path))
    return img
