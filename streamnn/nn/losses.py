"""Cross-entropy losses, each paired with the output activation it is fused with.

Design. A loss object owns the output layer's activation, so that both the loss and its
gradient are computed from the logits ``Z`` (K x batch), where they are stable:

* :class:`BinaryCrossEntropy` (sigmoid output, ``Y`` of 0/1, shape 1 x m)::

      L = 1/m sum( max(z, 0) - z y + log(1 + e^-|z|) )

* :class:`CategoricalCrossEntropy` (softmax output, ``Y`` one-hot, shape K x m)::

      L = -1/m sum( y * log_softmax(z) )

Both give the same gradient with respect to the logits, ``dL/dZ = (A - Y) / m``, which is
why the output activation has no separate backward rule. Data-parallel training divides by
the *global* batch count ``m`` (``gradient(A, Y, m)``) and reduces ``sum_from_logits``. ``from_probabilities`` is the
fallback for probabilities whose logits are unknown: it clips them to the open interval
(0, 1) of the dtype, so it too stays finite, but saturated outputs are then only bounded,
not exact. ``accuracy`` reads predictions the way the labels are encoded.
"""
from __future__ import annotations

import numpy as np

from streamnn.nn.functional import log_softmax, sigmoid, softmax


class CrossEntropy:
    """What the two losses share: the gradient with respect to the logits."""

    @staticmethod
    def gradient(A: np.ndarray, Y: np.ndarray, m: int | None = None) -> np.ndarray:
        """dL/dZ = (A - Y) / m; ``m`` defaults to the batch's columns (data-parallel: the global batch)."""
        return (A - Y) / (Y.shape[1] if m is None else m)

    @classmethod
    def from_logits(cls, Z: np.ndarray, Y: np.ndarray) -> float:
        """Mean loss over the batch, from the logits."""
        return float(cls.sum_from_logits(Z, Y) / Y.shape[1])


class BinaryCrossEntropy(CrossEntropy):
    """Sigmoid output with binary cross-entropy."""

    name = "sigmoid"

    @staticmethod
    def output(Z: np.ndarray) -> np.ndarray:
        """Probabilities A = sigmoid(Z)."""
        return sigmoid(Z)

    @staticmethod
    def sum_from_logits(Z: np.ndarray, Y: np.ndarray) -> np.floating:
        """Summed loss over the batch, from the logits (in the dtype of Z)."""
        return np.sum(np.maximum(Z, 0) - Z * Y + np.log1p(np.exp(-np.abs(Z))))

    @staticmethod
    def from_probabilities(A: np.ndarray, Y: np.ndarray) -> float:
        """Mean loss over the batch, from probabilities clipped inside (0, 1)."""
        m = Y.shape[1]
        info = np.finfo(A.dtype)
        A = np.clip(A, info.tiny, 1 - info.epsneg)
        return float(-np.sum(Y * np.log(A) + (1 - Y) * np.log(1 - A)) / m)

    @staticmethod
    def accuracy(A: np.ndarray, Y: np.ndarray) -> float:
        """Fraction of samples with (a > 0.5) == y."""
        return float(np.mean((A > 0.5) == (Y > 0.5)))


class CategoricalCrossEntropy(CrossEntropy):
    """Softmax output with categorical cross-entropy."""

    name = "softmax"

    @staticmethod
    def output(Z: np.ndarray) -> np.ndarray:
        """Probabilities A = softmax(Z), one column per sample."""
        return softmax(Z)

    @staticmethod
    def sum_from_logits(Z: np.ndarray, Y: np.ndarray) -> np.floating:
        """Summed loss over the batch, from the logits (in the dtype of Z)."""
        return -np.sum(Y * log_softmax(Z))

    @staticmethod
    def from_probabilities(A: np.ndarray, Y: np.ndarray) -> float:
        """Mean loss over the batch, from probabilities clipped away from 0."""
        m = Y.shape[1]
        return float(-np.sum(Y * np.log(np.clip(A, np.finfo(A.dtype).tiny, 1))) / m)

    @staticmethod
    def accuracy(A: np.ndarray, Y: np.ndarray) -> float:
        """Fraction of samples whose most probable class is the labelled one."""
        return float(np.mean(A.argmax(axis=0) == Y.argmax(axis=0)))


LOSSES = {loss.name: loss for loss in (BinaryCrossEntropy, CategoricalCrossEntropy)}
