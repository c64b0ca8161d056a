"""Inference: a checkpoint's model with its preprocessing, and predictions for image files.

A checkpoint records everything inference needs (:mod:`streamnn.run.state`): the model
(config and parameters), the class names and image shape, the packing options that turned
a photo into a stored row, and the standardization mean/std when training used it.
:class:`Predictor` holds them; :class:`~streamnn.data.transforms.Preprocess` turns normalized
rows into model inputs with the functions the training loader uses. Prediction reads images
in small batches with :func:`streamnn.pack.decode.load_image`, the function packing used; an
unreadable file yields an error entry and the others continue.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamnn.data.transforms import Preprocess
from streamnn.errors import StreamnnError
from streamnn.paths import path_text
from streamnn.run.checkpoint import load_checkpoint

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

    def predict(self, images: Any, *, channels: str = "BGR", tta: bool = False,
                batch_size: int = 64) -> list[dict[str, Any]]:
        """Class, probability and the probabilities of every class, for each image.

        ``images``: a path, a folder (searched recursively) or a list of them, decoded and resized
        exactly as ``streamnn-pack`` did for this model's store (an unreadable file raises
        :class:`StreamnnError` naming it); or NumPy uint8 images (H, W, C), one or a list or an
        (N, H, W, C) array, in ``channels`` order ("BGR" as OpenCV reads, "RGB" as PIL and
        matplotlib do), resized as packing resizes (area interpolation; packing's reduced JPEG
        decode does not apply to pixels already decoded). Results carry ``"path"`` for files.
        """
        if isinstance(images, (str, os.PathLike)) or (isinstance(images, (list, tuple)) and images
                                                      and isinstance(images[0], (str, os.PathLike))):
            results = []
            for path, result, error in predict_files(self, iter_image_files(
                    [images] if isinstance(images, (str, os.PathLike)) else images), tta=tta, batch_size=batch_size):
                if error is not None:
                    raise StreamnnError(error)
                results.append({"path": path, **result})
            return results
        arrays = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
        rows = np.stack([self._as_packed(np.asarray(a), channels) for a in arrays]) if arrays else None
        if rows is None:
            return []
        return [result for i in range(0, len(rows), batch_size)
                for result in self._classify(rows[i:i + batch_size], tta)]

    def _as_packed(self, img: np.ndarray, channels: str) -> np.ndarray:
        """An image array as packing stores it: this model's size, channel order, uint8."""
        import cv2

        if channels not in ("BGR", "RGB"):
            raise StreamnnError(f"channels must be 'BGR' or 'RGB', not {channels!r}")
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (1, 3) or 0 in img.shape:
            raise StreamnnError(f"an image must be uint8 (H, W, 3) or (H, W, 1), not {img.dtype} {img.shape}")
        if img.shape[2] == 3 and channels == "RGB":
            img = img[:, :, ::-1]
        h, w, c = self.image_shape
        if c == 1 and img.shape[2] == 3:
            img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2GRAY)[:, :, None]
        elif c == 3 and img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        if img.shape[:2] != (h, w):
            img = cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=cv2.INTER_AREA).reshape(h, w, c)
        return np.ascontiguousarray(img)

    def _classify(self, images: np.ndarray, tta: bool) -> list[dict[str, Any]]:
        """Results for packed uint8 images (B, H, W, C)."""
        from streamnn.run.metrics import class_probabilities

        probs = class_probabilities(predict_proba(self.model, self.prep, self.prep.rows_from_images(images), tta))
        if not np.isfinite(probs).all():
            raise StreamnnError("the model gives non-finite probabilities (NaN or inf): it is unusable",
                                path_text(self.path) if self.path is not None else None)
        results = []
        for col in probs.T:
            k = int(np.argmax(col)) if len(col) > 2 else int(col[1] > 0.5)
            results.append({"class": self.class_names[k], "probability": float(col[k]),
                            "probabilities": {n: float(p) for n, p in zip(self.class_names, col)}})
        return results


def predictor_from_content(content: dict[str, Any], path: str | os.PathLike | None = None) -> Predictor:
    """Rebuild the model and preprocessing from loaded checkpoint content (validated, see :mod:`streamnn.run.state`)."""
    from streamnn.run.state import read_data, read_model

    where = path_text(path) if path is not None else None
    data = read_data(content, path)
    model = read_model(content, path)
    outputs = getattr(model, "n_classes", None)
    if outputs is not None and outputs != (1 if len(data.class_names) == 2 else len(data.class_names)):
        raise StreamnnError(f"checkpoint model has {outputs} outputs for {len(data.class_names)} classes", where)
    model_shape = getattr(model, "image_shape", None)  # a ConvNet reads images, not just so many values
    if model_shape is not None and tuple(int(v) for v in model_shape) != data.image_shape:
        raise StreamnnError(f"checkpoint model takes {'x'.join(map(str, model_shape))} images but its data "
                            f"entries say {'x'.join(map(str, data.image_shape))}", where)
    prep = Preprocess(data.image_shape, data.mean, data.std, dtype=model_dtype(model))
    try:  # one image of the recorded shape must go through (a hand-edited shape or model would not)
        model.predict_proba(np.zeros((data.n_features, 1), model_dtype(model)))
    except (ValueError, StreamnnError) as exc:
        raise StreamnnError(f"checkpoint model does not take images of shape {data.image_shape} ({exc})",
                            where) from None
    return Predictor(model, prep, data.class_names, data.image_shape, data.options, data.channel_order,
                     data.fingerprint, Path(path) if path is not None else None)


def load_model(path: str | os.PathLike) -> Predictor:
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
        for (path, _), result in zip(batch, pred._classify(np.stack([img for _, img in batch]), tta)):
            yield path, result, None

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
