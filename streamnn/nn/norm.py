"""Batch normalization of dense outputs (D, B) or conv outputs (B, H, W, C).

Statistics are taken per feature (dense: over the batch axis) or per channel (conv: over
B, H and W); with N the number of values per statistic::

    train:  mu = mean(x),  var = mean((x - mu)^2),  x_hat = (x - mu) / sqrt(var + eps)
            running_mean = momentum running_mean + (1 - momentum) mu
            running_var  = momentum running_var  + (1 - momentum) var * N / (N - 1)
    eval:   x_hat = (x - running_mean) / sqrt(running_var + eps)
    y = gamma x_hat + beta

    backward (train):  dgamma = sum(dy x_hat)   dbeta = sum(dy)   dx_hat = dy gamma
       dx = (1 / sqrt(var + eps)) (dx_hat - mean(dx_hat) - x_hat mean(dx_hat x_hat))

The running statistics (unbiased variance, as PyTorch keeps them) are the layer's state
(``mean``, ``var``), saved in checkpoints; ``gamma`` (ones) and ``beta`` (zeros) are
parameters without L2.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from streamnn.errors import StreamnnError
from streamnn.nn.module import Layer, Shape


class BatchNorm(Layer):
    """Per-feature / per-channel normalization with learned scale and shift."""

    short_name = "bn"

    def __init__(self, momentum: float = 0.9, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0 <= float(momentum) < 1 or not float(eps) > 0:
            raise StreamnnError(f"BatchNorm needs momentum in [0, 1) and eps > 0, got {momentum}, {eps}")
        self.momentum, self.eps = float(momentum), float(eps)
        self._cache: tuple[np.ndarray, np.ndarray] | None = None  # (x_hat, 1 / sqrt(var + eps))

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: np.dtype) -> Shape:
        super().build(input_shape, rng, dtype)
        if len(input_shape) == 1:
            shape: tuple[int, ...] = (int(input_shape[0]), 1)
            self._axes: tuple[int, ...] = (1,)
        elif len(input_shape) == 3:
            shape = (int(input_shape[2]),)
            self._axes = (0, 1, 2)
        else:
            raise StreamnnError(f"BatchNorm needs features (D,) or images (H, W, C), not {tuple(input_shape)}")
        self.params = {"gamma": np.ones(shape, self.dtype), "beta": np.zeros(shape, self.dtype)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._state = {"mean": np.zeros(shape, self.dtype), "var": np.ones(shape, self.dtype)}
        return tuple(input_shape)

    @property
    def state(self) -> dict[str, np.ndarray]:
        return self._state

    def _stat_shape(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(1, 1, 1, -1) if self._axes == (0, 1, 2) else a

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        gamma, beta = self._stat_shape(self.params["gamma"]), self._stat_shape(self.params["beta"])
        if train_mode:
            mu = X.mean(axis=self._axes, keepdims=True)
            centred = X - mu
            var = np.mean(centred * centred, axis=self._axes, keepdims=True)
            n = X.size // mu.size
            m = self.momentum
            mean_s, var_s = self._state["mean"], self._state["var"]
            mean_s *= m
            mean_s += (1 - m) * mu.reshape(mean_s.shape)
            var_s *= m
            var_s += (1 - m) * var.reshape(var_s.shape) * (n / max(n - 1, 1))
            inv = 1 / np.sqrt(var + self.eps)
            x_hat = centred * inv
            self._cache = (x_hat, inv)
        else:
            inv = 1 / np.sqrt(self._stat_shape(self._state["var"]) + self.eps)
            x_hat = (X - self._stat_shape(self._state["mean"])) * inv
        return x_hat * gamma + beta

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() in train mode first")
        x_hat, inv = self._cache
        axes = self._axes
        self.grads["gamma"][...] = np.sum(dY * x_hat, axis=axes).reshape(self.grads["gamma"].shape)
        self.grads["beta"][...] = np.sum(dY, axis=axes).reshape(self.grads["beta"].shape)
        if not self.needs_input_grad:
            return None
        dx_hat = dY * self._stat_shape(self.params["gamma"])
        dx = dx_hat - dx_hat.mean(axis=axes, keepdims=True)
        dx -= x_hat * np.mean(dx_hat * x_hat, axis=axes, keepdims=True)
        dx *= inv
        return dx

    def config(self) -> dict[str, Any]:
        return {"type": "BatchNorm", "momentum": self.momentum, "eps": self.eps}
