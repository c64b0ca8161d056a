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

Conv outputs. The elementwise passes run over blocks of whole images (about ``NORM_BLOCK``
values each) on the worker threads of :func:`streamnn.threads.run_blocks`, into buffers reused
across steps (the output and input gradient are valid until the next forward / backward), with
the passes over one block done while it is in the CPU's cache; the per-channel sums stay single
whole-batch reductions, so every number is that of the formulas above evaluated over the whole
batch at once.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from streamnn.errors import StreamnnError
from streamnn.nn.module import Layer, Shape
from streamnn.threads import run_blocks

#: Values per block of the elementwise passes over conv outputs (whole images; any size gives the same numbers).
NORM_BLOCK = 1 << 16


def both(thunks: tuple[Any, Any]) -> list[Any]:
    """The results of two independent whole-batch reductions, computed side by side on the worker threads."""
    results: list[Any] = [None, None]

    def run(i: int) -> None:
        results[i] = thunks[i]()

    run_blocks(run, 2)
    return results


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
        self._bufs: dict[str, np.ndarray] = {}
        self._image_size = math.prod(int(n) for n in input_shape)
        return tuple(input_shape)

    @property
    def state(self) -> dict[str, np.ndarray]:
        return self._state

    def _stat_shape(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(1, 1, 1, -1) if self._axes == (0, 1, 2) else a

    def _update_running(self, mu: np.ndarray, var: np.ndarray, n: int) -> None:
        m = self.momentum
        mean_s, var_s = self._state["mean"], self._state["var"]
        mean_s *= m
        mean_s += (1 - m) * mu.reshape(mean_s.shape)
        var_s *= m
        var_s += (1 - m) * var.reshape(var_s.shape) * (n / max(n - 1, 1))

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        if self._axes == (0, 1, 2):
            return self._forward_images(X, train_mode)
        gamma, beta = self._stat_shape(self.params["gamma"]), self._stat_shape(self.params["beta"])
        if train_mode:
            mu = X.mean(axis=self._axes, keepdims=True)
            centred = X - mu
            var = np.mean(centred * centred, axis=self._axes, keepdims=True)
            self._update_running(mu, var, X.size // mu.size)
            inv = 1 / np.sqrt(var + self.eps)
            x_hat = centred * inv
            self._cache = (x_hat, inv)
        else:
            inv = 1 / np.sqrt(self._stat_shape(self._state["var"]) + self.eps)
            x_hat = (X - self._stat_shape(self._state["mean"])) * inv
        return x_hat * gamma + beta

    # -- conv outputs: passes in blocks of images, into reused buffers ---------------------------------
    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        buf = self._bufs.get(name)
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = self._bufs[name] = np.empty(shape, self.dtype)
        return buf[:shape[0]]

    def _in_blocks(self, B: int, fn: Any) -> None:
        """``fn(slice of images)`` for blocks of about NORM_BLOCK values, on the worker threads."""
        nb = max(1, NORM_BLOCK // max(1, self._image_size))
        run_blocks(lambda i: fn(slice(i * nb, min(B, (i + 1) * nb))), -(-B // nb))

    def _forward_images(self, X: np.ndarray, train_mode: bool) -> np.ndarray:
        gamma, beta = self._stat_shape(self.params["gamma"]), self._stat_shape(self.params["beta"])
        Y = self._buffer("out", X.shape)
        if not train_mode:
            mean = self._stat_shape(self._state["mean"])
            inv = 1 / np.sqrt(self._stat_shape(self._state["var"]) + self.eps)

            def evaluate(b: slice) -> None:
                np.multiply(np.subtract(X[b], mean, out=Y[b]), inv, out=Y[b])
                Y[b] *= gamma
                Y[b] += beta

            self._in_blocks(len(X), evaluate)
            return Y
        axes = self._axes
        x_hat, square = self._buffer("x_hat", X.shape), self._buffer("work", X.shape)
        mu = X.mean(axis=axes, keepdims=True)

        def centre(b: slice) -> None:
            np.subtract(X[b], mu, out=x_hat[b])  # centred, until scaled below
            np.multiply(x_hat[b], x_hat[b], out=square[b])

        self._in_blocks(len(X), centre)
        var = np.mean(square, axis=axes, keepdims=True)
        self._update_running(mu, var, X.size // mu.size)
        inv = 1 / np.sqrt(var + self.eps)

        def scale(b: slice) -> None:
            x_hat[b] *= inv
            np.multiply(x_hat[b], gamma, out=Y[b])
            Y[b] += beta

        self._in_blocks(len(X), scale)
        self._cache = (x_hat, inv)
        return Y

    def _backward_images(self, dY: np.ndarray) -> np.ndarray | None:
        x_hat, inv = self._cache  # type: ignore[misc]
        axes, gamma = self._axes, self._stat_shape(self.params["gamma"])
        work = self._buffer("work", dY.shape)
        self._in_blocks(len(dY), lambda b: np.multiply(dY[b], x_hat[b], out=work[b]))
        both((lambda: np.sum(work, axis=axes, out=self.grads["gamma"]),  # the two sums side by side
              lambda: np.sum(dY, axis=axes, out=self.grads["beta"])))
        if not self.needs_input_grad:
            return None
        dX = self._buffer("dX", dY.shape)

        def products(b: slice) -> None:
            np.multiply(dY[b], gamma, out=dX[b])  # dx_hat, until finished below
            np.multiply(dX[b], x_hat[b], out=work[b])

        self._in_blocks(len(dY), products)
        mean_dx_hat, mean_product = both((lambda: dX.mean(axis=axes, keepdims=True),
                                          lambda: np.mean(work, axis=axes, keepdims=True)))

        def finish(b: slice) -> None:
            dX[b] -= mean_dx_hat
            np.multiply(x_hat[b], mean_product, out=work[b])
            dX[b] -= work[b]
            dX[b] *= inv

        self._in_blocks(len(dY), finish)
        return dX

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() in train mode first")
        if self._axes == (0, 1, 2):
            return self._backward_images(np.ascontiguousarray(dY))
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
