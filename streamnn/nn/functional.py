"""Activation functions, written from their formulas.

Design. Arrays are laid out features x batch, as everywhere in streamnn. A hidden-layer
activation is an :class:`Activation` with

* ``forward(Z) -> A``: the elementwise function, computed in Z's dtype;
* ``backward(dA, Z, A) -> dZ``: the chain rule ``dZ = dA * g'(Z)``, with ``g'`` written
  from whichever of ``Z`` or ``A = g(Z)`` gives it most cheaply. It may overwrite ``dA``;
* ``init``: the weight initialization that keeps its layer's variance steady, ``"he"``
  for the ReLU family and ``"xavier"`` (Glorot) for the saturating ones.

The output-layer functions :func:`sigmoid` and :func:`softmax` are plain functions: they
are computed stably (no overflow for any finite logit) and their derivatives are fused
with the cross-entropy in :mod:`streamnn.nn.losses` (``dZ = A - Y``), so they have no
``backward`` of their own. ``ACTIVATIONS`` maps the names accepted in a model's
``activation_func`` list to hidden-layer activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

LEAKY_SLOPE = 0.01  # leaky_relu(z) = z for z > 0, 0.01 z otherwise


def sigmoid(Z: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-z), evaluated as e^-|z| based fractions so that no exp overflows."""
    E = np.exp(-np.abs(Z))
    S = 1 / (1 + E)
    return np.where(Z >= 0, S, E * S)


def softmax(Z: np.ndarray) -> np.ndarray:
    """Columnwise e^z_k / sum_j e^z_j, with the column maximum subtracted first."""
    E = np.exp(Z - Z.max(axis=0, keepdims=True))
    E /= E.sum(axis=0, keepdims=True)
    return E


def log_softmax(Z: np.ndarray) -> np.ndarray:
    """Columnwise log softmax: z_k - max - log sum_j e^(z_j - max)."""
    shifted = Z - Z.max(axis=0, keepdims=True)
    shifted -= np.log(np.exp(shifted).sum(axis=0, keepdims=True))
    return shifted


@dataclass(frozen=True)
class Activation:
    """A hidden-layer activation: the function, its backward rule and its initialization."""

    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    backward: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    init: str  # "he" or "xavier"


def _relu_backward(dA: np.ndarray, Z: np.ndarray, A: np.ndarray) -> np.ndarray:
    """dZ = dA * [z > 0]."""
    np.multiply(dA, Z > 0, out=dA)
    return dA


def _leaky_relu_backward(dA: np.ndarray, Z: np.ndarray, A: np.ndarray) -> np.ndarray:
    """dZ = dA * (1 if z > 0 else slope)."""
    np.multiply(dA, LEAKY_SLOPE, out=dA, where=Z <= 0)
    return dA


def _sigmoid_backward(dA: np.ndarray, Z: np.ndarray, A: np.ndarray) -> np.ndarray:
    """dZ = dA * a (1 - a)."""
    dA *= A
    dA *= 1 - A
    return dA


def _tanh_backward(dA: np.ndarray, Z: np.ndarray, A: np.ndarray) -> np.ndarray:
    """dZ = dA * (1 - a^2)."""
    dA *= 1 - A * A
    return dA


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation("relu", lambda Z: np.maximum(Z, 0), _relu_backward, "he"),
    "leaky_relu": Activation("leaky_relu", lambda Z: np.where(Z > 0, Z, LEAKY_SLOPE * Z),
                             _leaky_relu_backward, "he"),
    "sigmoid": Activation("sigmoid", sigmoid, _sigmoid_backward, "xavier"),
    "tanh": Activation("tanh", np.tanh, _tanh_backward, "xavier"),
}
