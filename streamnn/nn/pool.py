"""Pooling and reshaping of NHWC images: MaxPool2D, GlobalAvgPool2D, Flatten.

MaxPool2D (2x2 windows, stride 2; an odd last row / column is dropped, as in Keras)::

    Y[n, y, x, c] = max over a, b in {0, 1} of X[n, 2y + a, 2x + b, c]

computed as a reshape ``(B, Ho, 2, Wo, 2, C)`` and three elementwise maxima. The backward
pass routes each window's gradient to ONE maximum: the first of the four positions, in the
order (0,0), (0,1), (1,0), (1,1), that equals the window's maximum (ties, e.g. a ReLU's
zeros, would otherwise receive the gradient several times); its input gradient is written
into a buffer reused across steps (valid until the next backward)::

    dX[n, 2y + a, 2x + b, c] = dY[n, y, x, c] * [(a, b) is that first maximum]

GlobalAvgPool2D: ``Y[c, n] = mean over y, x of X[n, y, x, c]`` (features x batch), with
``dX[n, y, x, c] = dY[c, n] / (H W)``.

Flatten: ``(B, H, W, C)`` -> ``(H*W*C, B)`` features x batch, the same feature order as a
store row (HWC); a free view for a contiguous input.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from streamnn.errors import StreamnnError
from streamnn.nn.module import Layer, Shape

_WINDOW = ((0, 0), (0, 1), (1, 0), (1, 1))


def _image_shape(layer: str, shape: Shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise StreamnnError(f"{layer} needs images (H, W, C), got samples of shape {tuple(shape)}")
    return int(shape[0]), int(shape[1]), int(shape[2])


class MaxPool2D(Layer):
    """2x2 max-pooling with stride 2."""

    short_name = "pool"

    def __init__(self, pool: int = 2) -> None:
        super().__init__()
        if int(pool) != 2:
            raise StreamnnError(f"MaxPool2D supports 2x2 windows (stride 2) only, not {pool}")
        self.pool = 2
        self._cache: tuple[np.ndarray, np.ndarray] | None = None
        self._bufs: dict[str, np.ndarray] = {}  # backward buffers, reused while the batch shape holds

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: np.dtype) -> Shape:
        super().build(input_shape, rng, dtype)
        H, W, C = _image_shape("MaxPool2D", input_shape)
        if H < 2 or W < 2:
            raise StreamnnError(f"MaxPool2D needs images of at least 2x2, not {H}x{W}")
        self.in_shape = (H, W, C)
        return (H // 2, W // 2, C)

    def _windows(self, X: np.ndarray) -> np.ndarray:
        B, (H, W, C) = X.shape[0], self.in_shape
        Ho, Wo = H // 2, W // 2
        X = X[:, :2 * Ho, :2 * Wo]
        return np.ascontiguousarray(X).reshape(B, Ho, 2, Wo, 2, C)

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        Xr = self._windows(X)
        out = np.maximum(Xr[:, :, 0, :, 0], Xr[:, :, 0, :, 1])
        np.maximum(out, Xr[:, :, 1, :, 0], out=out)
        np.maximum(out, Xr[:, :, 1, :, 1], out=out)
        self._cache = (Xr, out) if train_mode else self._cache
        return out

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        buf = self._bufs.get(name)
        if buf is None or buf.shape != shape:
            buf = self._bufs[name] = np.empty(shape, dtype)
        return buf

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() in train mode first")
        Xr, out = self._cache
        B, (H, W, C) = Xr.shape[0], self.in_shape
        dX = self._buffer("dX", (B, H, W, C), self.dtype)
        Ho, Wo = H // 2, W // 2
        even = H % 2 == 0 and W % 2 == 0
        if not even:
            dX.fill(0)  # the dropped last row / column get no gradient
        dXr = dX.reshape(B, Ho, 2, Wo, 2, C) if even else None
        taken = self._buffer("taken", out.shape, np.dtype(bool))
        hit = self._buffer("hit", out.shape, np.dtype(bool))
        for n, (a, b) in enumerate(_WINDOW):
            np.equal(Xr[:, :, a, :, b], out, out=hit)
            if n == 0:
                np.copyto(taken, hit)
            else:
                np.greater(hit, taken, out=hit)  # hit and not taken, with no temporary
                if n < 3:
                    taken |= hit
            if dXr is not None:
                np.multiply(dY, hit, out=dXr[:, :, a, :, b])
            else:
                dX[:, a:2 * Ho:2, b:2 * Wo:2] = dY * hit
        return dX

    def config(self) -> dict[str, Any]:
        return {"type": "MaxPool2D", "pool": self.pool}


class GlobalAvgPool2D(Layer):
    """Mean over H and W: (B, H, W, C) -> (C, B)."""

    short_name = "gap"

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: np.dtype) -> Shape:
        super().build(input_shape, rng, dtype)
        self.in_shape = _image_shape("GlobalAvgPool2D", input_shape)
        return (self.in_shape[2],)

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        return X.mean(axis=(1, 2)).T

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        H, W, C = self.in_shape
        dX = np.empty((dY.shape[1], H, W, C), self.dtype)
        np.copyto(dX, (dY.T / (H * W))[:, None, None, :])
        return dX


class Flatten(Layer):
    """(B, H, W, C) -> (H*W*C, B), the store's row order."""

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: np.dtype) -> Shape:
        super().build(input_shape, rng, dtype)
        self.in_shape = tuple(int(s) for s in input_shape)
        return (math.prod(self.in_shape),)

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        return X.reshape(X.shape[0], math.prod(self.in_shape)).T  # also for no samples (an empty rank's share)

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        return np.ascontiguousarray(dY.T).reshape(dY.shape[1], *self.in_shape)
