"""Inverted dropout (train mode only).

    forward:   A_out = A * mask,   mask = [u >= p] / (1 - p),  u ~ U[0, 1) per entry
    backward:  dA = dA_out * mask

``p`` is the probability of *dropping* a unit. The uniforms come from the generator given
to :meth:`build` (the model's, whose state the model saves), so the masks follow that
generator's state and a resumed run draws the same ones. In eval mode the layer is the
identity.

Data-parallel. With ``share = (rank, W, m)`` set (by :meth:`Network.forward`), the input holds
the samples ``rank::W`` of a global batch of m: the layer draws the uniforms of the whole
global batch, exactly as one process would (same shape, same generator state on every rank),
and keeps its samples' ones. The generators of all ranks stay equal, and the masks do not
depend on W.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from streamnn.errors import StreamnnError
from streamnn.nn.module import Layer, Shape


class Dropout(Layer):
    """Drop each unit with probability ``rate``; scale the kept ones by 1 / (1 - rate)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        if not 0 <= float(rate) < 1:
            raise StreamnnError(f"dropout (drop probability) must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.rng: np.random.Generator | None = None
        self.mask: np.ndarray | None = None
        self.share: tuple[int, int, int] | None = None  # (rank, world size, global batch)
        self._batch_axis = -1

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: np.dtype) -> Shape:
        self.rng = rng
        self._batch_axis = -1 if len(input_shape) == 1 else 0  # (D, m) features, or (m, H, W, C) images
        return super().build(input_shape, rng, dtype)

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        if not train_mode or self.rate == 0:
            return X
        if self.rng is None:
            raise RuntimeError("Dropout needs build() (it draws from the model's generator)")
        if self.share is None:
            u = self.rng.random(X.shape)
        else:
            rank, world, m = self.share
            shape = list(X.shape)
            shape[self._batch_axis] = m
            u = np.moveaxis(np.moveaxis(self.rng.random(shape), self._batch_axis, 0)[rank::world], 0, self._batch_axis)
        keep = (u >= self.rate).astype(X.dtype)
        keep /= 1 - self.rate
        self.mask = keep
        return X * keep

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        if self.rate == 0:
            return dY
        if self.mask is None:
            raise RuntimeError("backward() needs a forward() in train mode first")
        dY *= self.mask
        return dY

    def config(self) -> dict[str, Any]:
        return {"type": "Dropout", "rate": self.rate}
