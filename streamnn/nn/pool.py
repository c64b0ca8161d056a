"""Pooling and reshaping of NHWC images: MaxPool2D, GlobalAvgPool2D, Flatten.

MaxPool2D (2x2 windows, stride 2; an odd last row / column is dropped, as in Keras)::

    Y[n, y, x, c] = max over a, b in {0, 1} of X[n, 2y + a, 2x + b, c]

computed as a reshape ``(B, Ho, 2, Wo, 2, C)`` and three elementwise maxima. The backward
pass routes each window's gradient to ONE maximum: the first of the four positions, in the
order (0,0), (0,1), (1,0), (1,1), that equals the window's maximum (ties, e.g. a ReLU's
zeros, would otherwise receive the gradient several times); its input gradient is written
into a buffer reused across steps (valid until the next backward), and so is the output
(valid until the next forward)::

    dX[n, 2y + a, 2x + b, c] = dY[n, y, x, c] * [(a, b) is that first maximum]

Both passes run over blocks of whole images (about ``POOL_BLOCK`` outputs each) on the worker
threads of :func:`streamnn.threads.run_blocks`, so the masks of a block stay in the CPU's cache;
every value is computed as over the whole batch, so the numbers do not depend on the blocks.

GlobalAvgPool2D: ``Y[c, n] = mean over y, x of X[n, y, x, c]`` (features x batch), with
``dX[n, y, x, c] = dY[c, n] / (H W)``.

Flatten: ``(B, H, W, C)`` -> ``(H*W*C, B)`` features x batch, the same feature order as a
store row (HWC); a free view for a contiguous input.
"""
from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from streamnn.errors import StreamnnError
from streamnn.nn.module import Layer, Shape
from streamnn.threads import run_blocks

_WINDOW = ((0, 0), (0, 1), (1, 0), (1, 1))
#: Outputs per block of MaxPool2D's passes (whole images; any size gives the same numbers).
POOL_BLOCK = 1 << 16


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
        self._cache: tuple[np.ndarray, np.ndarray] | None = None  # (X, Y) of the last train-mode forward
        self._bufs: dict[str, np.ndarray] = {}  # the output and input gradient, reused while the shape holds
        self._local = threading.local()  # each worker thread's masks

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: np.dtype) -> Shape:
        super().build(input_shape, rng, dtype)
        H, W, C = _image_shape("MaxPool2D", input_shape)
        if H < 2 or W < 2:
            raise StreamnnError(f"MaxPool2D needs images of at least 2x2, not {H}x{W}")
        self.in_shape = (H, W, C)
        self._bufs, self._local = {}, threading.local()
        return (H // 2, W // 2, C)

    def _windows(self, X: np.ndarray) -> np.ndarray:
        """X (n, H, W, C) as (n, Ho, 2, Wo, 2, C) windows (an odd last row / column dropped)."""
        (H, W, C), n = self.in_shape, X.shape[0]
        return X[:, :H // 2 * 2, :W // 2 * 2].reshape(n, H // 2, 2, W // 2, 2, C)

    def _blocks(self, B: int) -> tuple[int, int]:
        """(images per block, blocks) for a batch of B."""
        H, W, C = self.in_shape
        nb = max(1, POOL_BLOCK // max(1, H // 2 * (W // 2) * C))
        return nb, -(-B // nb)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        buf = self._bufs.get(name)
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = self._bufs[name] = np.empty(shape, dtype)
        return buf[:shape[0]]

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        B, (H, W, C) = X.shape[0], self.in_shape
        out = self._buffer("out", (B, H // 2, W // 2, C), self.dtype)
        nb, count = self._blocks(B)

        def block(i: int) -> None:
            b0, b1 = i * nb, min(B, (i + 1) * nb)
            Xr, Y = self._windows(X[b0:b1]), out[b0:b1]
            np.maximum(Xr[:, :, 0, :, 0], Xr[:, :, 0, :, 1], out=Y)
            np.maximum(Y, Xr[:, :, 1, :, 0], out=Y)
            np.maximum(Y, Xr[:, :, 1, :, 1], out=Y)

        run_blocks(block, count)
        self._cache = (X, out) if train_mode else self._cache
        return out

    def _masks(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """This thread's two boolean buffers for a block of outputs of ``shape``."""
        bufs = self._local.__dict__
        if bufs.get("taken") is None or bufs["taken"].shape[1:] != shape[1:] or len(bufs["taken"]) < shape[0]:
            bufs["taken"], bufs["hit"] = np.empty(shape, bool), np.empty(shape, bool)
        return bufs["taken"][:shape[0]], bufs["hit"][:shape[0]]

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() in train mode first")
        X, out = self._cache
        B, (H, W, C) = X.shape[0], self.in_shape
        dX = self._buffer("dX", (B, H, W, C), self.dtype)
        nb, count = self._blocks(B)
        even = H % 2 == 0 and W % 2 == 0

        def block(i: int) -> None:
            b0, b1 = i * nb, min(B, (i + 1) * nb)
            Xr, Y, dYb = self._windows(X[b0:b1]), out[b0:b1], dY[b0:b1]
            if not even:
                dX[b0:b1].fill(0)  # the dropped last row / column get no gradient
            dXr = self._windows(dX[b0:b1])
            taken, hit = self._masks((nb, *Y.shape[1:]))
            taken, hit = taken[:b1 - b0], hit[:b1 - b0]
            for n, (a, b) in enumerate(_WINDOW):
                mask = taken if n == 0 else hit  # the first position's hits are the first ones taken
                np.equal(Xr[:, :, a, :, b], Y, out=mask)
                if n > 0:
                    np.greater(hit, taken, out=hit)  # hit and not taken, with no temporary
                    if n < 3:
                        taken |= hit
                np.multiply(dYb, mask, out=dXr[:, :, a, :, b])

        run_blocks(block, count)
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
