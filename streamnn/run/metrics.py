"""Classification metrics, accumulated over mini-batches so that evaluation streams.

Design. Models output probabilities column-wise, like the loader's targets: ``(1, B)`` for a
binary sigmoid model (probability of class 1) or ``(K, B)`` for softmax. The helpers here turn
either form into integer labels; :class:`Metrics` keeps only a running loss sum, a sample
count and a ``K x K`` confusion matrix (rows: true class, columns: predicted class), so its
memory does not depend on the number of samples. Loss is the mean cross-entropy of the data
(no weight-decay term), accumulated in float64 in batch order: the same batches in the same
order give bit-identical results, which resumable training relies on.
"""
from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12


def true_labels(Y: np.ndarray) -> np.ndarray:
    """Integer labels (B,) from targets: (1, B) of 0/1, (K, B) one-hot, or already (B,)."""
    Y = np.asarray(Y)
    if Y.ndim == 1:
        return Y.astype(np.int64)
    if Y.shape[0] == 1:
        return (Y[0] > 0.5).astype(np.int64)
    return np.argmax(Y, axis=0).astype(np.int64)


def predicted_labels(P: np.ndarray) -> np.ndarray:
    """Predicted labels (B,) from probabilities (1, B) (class 1 when p > 0.5) or (K, B) (argmax)."""
    P = np.asarray(P)
    if P.shape[0] == 1:
        return (P[0] > 0.5).astype(np.int64)
    return np.argmax(P, axis=0).astype(np.int64)


def class_probabilities(P: np.ndarray) -> np.ndarray:
    """(K, B) probabilities of every class; a binary (1, B) output becomes [1 - p; p]."""
    P = np.asarray(P, dtype=np.float64)
    return np.concatenate([1.0 - P, P], axis=0) if P.shape[0] == 1 else P


def cross_entropy(P: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy (B,) in float64, probabilities clipped to [EPS, 1]."""
    probs = class_probabilities(P)
    picked = probs[np.asarray(labels, dtype=np.int64), np.arange(probs.shape[1])]
    return -np.log(np.clip(picked, EPS, 1.0))


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """K x K int64 counts: row = true class, column = predicted class."""
    flat = np.asarray(labels, np.int64) * n_classes + np.asarray(predicted, np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def precision_recall(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class precision and recall from a confusion matrix (0.0 where undefined)."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp, predicted, actual = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    return precision, recall


class Metrics:
    """Streaming loss, accuracy and confusion matrix over batches of (probabilities, targets)."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = int(n_classes)
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.count = 0
        self.confusion = np.zeros((self.n_classes, self.n_classes), np.int64)

    def update(self, P: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Add one batch; ``Y`` as targets or integer labels. Returns the batch's predicted labels."""
        labels, predicted = true_labels(Y), predicted_labels(P)
        self.loss_sum += float(np.sum(cross_entropy(P, labels)))
        self.count += len(labels)
        self.confusion += confusion_matrix(labels, predicted, self.n_classes)
        return predicted

    def sums(self) -> np.ndarray:
        """``[loss_sum, count, *confusion]`` as float64 (counts are exact below 2**53), for reductions."""
        return np.concatenate([[self.loss_sum, self.count], self.confusion.ravel()]).astype(np.float64)

    def add_sums(self, sums: np.ndarray) -> None:
        """Add :meth:`sums` of other batches (e.g. summed over the ranks)."""
        self.loss_sum += float(sums[0])
        self.count += int(sums[1])
        self.confusion += np.asarray(sums[2:]).astype(np.int64).reshape(self.confusion.shape)

    def reduce(self, comm: Any) -> None:
        """Replace the sums by their total over the ranks of ``comm`` (a :class:`streamnn.dist.Comm`)."""
        sums = self.sums()
        comm.allreduce(sums)
        self.reset()
        self.add_sums(sums)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion)) / self.count if self.count else float("nan")

    def summary(self, class_names: list[str] | None = None) -> dict[str, Any]:
        """JSON-able dict: n, loss, accuracy, confusion matrix, per-class precision and recall."""
        names = class_names or [str(i) for i in range(self.n_classes)]
        precision, recall = precision_recall(self.confusion)
        return {
            "n": self.count, "loss": self.loss, "accuracy": self.accuracy,
            "confusion": self.confusion.tolist(), "class_names": list(names),
            "per_class": {name: {"precision": float(p), "recall": float(r), "support": int(s)}
                          for name, p, r, s in zip(names, precision, recall, self.confusion.sum(axis=1))},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "count": self.count, "confusion": self.confusion.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        confusion = np.asarray(state["confusion"], np.int64)
        if confusion.shape != (self.n_classes, self.n_classes):
            raise ValueError(f"confusion matrix of shape {confusion.shape}, expected {self.n_classes} classes")
        self.loss_sum, self.count, self.confusion = float(state["loss_sum"]), int(state["count"]), confusion.copy()
