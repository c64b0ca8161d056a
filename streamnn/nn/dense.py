"""Fully connected layer in the tutorial's layout (features x batch).

    forward:   Z = W A + b                  W (n_out, n_in), b (n_out, 1), A (n_in, m)
    backward:  dW = dZ A^T    db = sum_batch dZ    dA = W^T dZ

``dZ`` is the gradient of the *mean* cost (the loss head divides by m once), so no 1/m
appears here. Initialization (``init``): "he" ``N(0, 2/n_in)`` for the ReLU family,
"xavier" ``N(0, 2/(n_in + n_out))`` for saturating activations and the output layer,
"zeros" for logistic regression; biases are zero. Draws are float64 from the model's
generator, rounded to the model's dtype, so float32 and float64 models start alike.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from streamnn.errors import StreamnnError
from streamnn.nn.module import Layer, Shape

INITS = ("he", "xavier", "zeros")


def initial_weights(rng: np.random.Generator, shape: Shape, fan_in: int, fan_out: int, init: str,
                    dtype: np.dtype) -> np.ndarray:
    """He / Xavier normal draws (float64, then rounded) or zeros."""
    if init == "zeros":
        return np.zeros(shape, dtype)
    var = 2 / fan_in if init == "he" else 2 / (fan_in + fan_out)
    return (rng.standard_normal(shape) * np.sqrt(var)).astype(dtype)


class Dense(Layer):
    """``Z = W A + b`` with ``units`` outputs."""

    decay = ("W",)

    def __init__(self, units: int, init: str = "he") -> None:
        super().__init__()
        if int(units) < 1:
            raise StreamnnError(f"a Dense layer needs at least 1 unit, not {units}")
        if init not in INITS:
            raise StreamnnError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
        self.units, self.init = int(units), init
        self._A: np.ndarray | None = None

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: np.dtype) -> Shape:
        super().build(input_shape, rng, dtype)
        if len(input_shape) != 1:
            raise StreamnnError(f"Dense needs flat inputs, got samples of shape {tuple(input_shape)} "
                                "(add Flatten first)")
        n_in = int(input_shape[0])
        self.params = {"W": initial_weights(rng, (self.units, n_in), n_in, self.units, self.init, self.dtype),
                       "b": np.zeros((self.units, 1), self.dtype)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        return (self.units,)

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        Z = np.dot(self.params["W"], X)
        Z += self.params["b"]
        self._A = X if train_mode else self._A
        return Z

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        if self._A is None:
            raise RuntimeError("backward() needs a forward() in train mode first")
        np.dot(dY, self._A.T, out=self.grads["W"])
        np.sum(dY, axis=1, keepdims=True, out=self.grads["b"])
        return np.dot(self.params["W"].T, dY) if self.needs_input_grad else None

    def config(self) -> dict[str, Any]:
        return {"type": "Dense", "units": self.units, "init": self.init}
