"""2-D convolution over NHWC images: im2col into a reused column buffer, then one GEMM.

With input ``X`` (B, H, W, C), kernel size k, stride s, padding p (``"same"``: k // 2, so
stride 1 keeps H x W; ``"valid"``: 0), output size ``Ho = (H + 2p - k) // s + 1`` (same for
W), weights ``W`` (k, k, C, F) and bias ``b`` (F,)::

    Xp = X zero-padded by p on both sides of H and W
    cols[n, y, x, i, j, c] = Xp[n, s*y + i, s*x + j, c]          (B*Ho*Wo, k*k*C)
                               (copied one kernel row i at a time: for each (n, y, x) the k*C
                               values of taps (i, 0..k-1) are one contiguous run of Xp)
    Y = cols @ W.reshape(k*k*C, F) + b                             (B, Ho, Wo, F)

    dW = cols^T @ dY2          db = sum over B, Ho, Wo of dY       dY2 = dY as (B*Ho*Wo, F)
    dcols = dY2 @ W2^T;        dXp[:, s*y + i, s*x + j, :] += dcols[:, y, x, i, j, :]
                               (k*k shifted, strided slice-adds; never np.add.at)

Buffers. The padded input, the column matrix and the output are preallocated for the
largest batch seen and reused (``out=``) across steps; the backward pass writes the input
gradient columns over the column buffer (it is no longer needed once dW is computed).
So a layer's output and gradients are valid until its next forward: a model forwards in
train mode, then backwards, then steps (an eval-mode forward in between would overwrite
the cache of a conv net; :class:`~streamnn.nn.network.Network` then refuses the backward).

Initialization: He, ``N(0, 2 / (k*k*C))``, biases zero (draws as in :mod:`.dense`).
``bias=False`` drops ``b`` (for a convolution followed by a batch norm: the norm subtracts the
per-channel mean, so a bias has no effect there and its gradient is exactly zero).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from streamnn.errors import StreamnnError
from streamnn.nn.dense import initial_weights
from streamnn.nn.module import Layer, Shape

PADDINGS = ("same", "valid")


def conv_output_size(n: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a convolution along one axis."""
    return (n + 2 * pad - kernel) // stride + 1


class Conv2D(Layer):
    """``filters`` k x k convolutions of NHWC images, stride 1 or 2, "same" or "valid" padding."""

    decay = ("W",)
    short_name = "conv"

    def __init__(self, filters: int, kernel: int = 3, stride: int = 1, padding: str = "same",
                 init: str = "he", bias: bool = True) -> None:
        super().__init__()
        if int(filters) < 1 or int(kernel) < 1 or int(stride) < 1:
            raise StreamnnError(f"Conv2D needs positive filters, kernel and stride, got {filters}, {kernel}, {stride}")
        if padding not in PADDINGS:
            raise StreamnnError(f"padding must be 'same' or 'valid', not {padding!r}")
        self.filters, self.kernel, self.stride, self.padding, self.init = (
            int(filters), int(kernel), int(stride), padding, init)
        self.pad = self.kernel // 2 if padding == "same" else 0
        self.bias = bool(bias)  # False before a batch norm, whose mean subtraction cancels any bias
        self._bufs: dict[str, np.ndarray] = {}
        self._b: int | None = None  # rows of the last train-mode forward (0: an empty rank's share)

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: np.dtype) -> Shape:
        super().build(input_shape, rng, dtype)
        if len(input_shape) != 3:
            raise StreamnnError(f"Conv2D needs images (H, W, C), got samples of shape {tuple(input_shape)}")
        H, W, C = (int(s) for s in input_shape)
        k, s, p = self.kernel, self.stride, self.pad
        self.in_shape = (H, W, C)
        self.out_hw = (conv_output_size(H, k, s, p), conv_output_size(W, k, s, p))
        if min(self.out_hw) < 1:
            raise StreamnnError(f"a {k}x{k} {self.padding} convolution does not fit {H}x{W} images")
        fan_in = k * k * C
        self.params = {"W": initial_weights(rng, (k, k, C, self.filters), fan_in, self.filters, self.init, self.dtype)}
        if self.bias:
            self.params["b"] = np.zeros(self.filters, self.dtype)
        self.grads = {name: np.zeros_like(v) for name, v in self.params.items()}
        self._bufs = {}
        return (*self.out_hw, self.filters)

    def _buffer(self, name: str, B: int, shape: tuple[int, ...], zeros: bool = False) -> np.ndarray:
        """A reused buffer of at least B rows (grown when a larger batch comes), sliced to B."""
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < B:
            buf = self._bufs[name] = (np.zeros if zeros else np.empty)((B, *shape), self.dtype)
        return buf[:B]

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        B = X.shape[0]
        (H, W, C), (Ho, Wo), k, s, p, F = self.in_shape, self.out_hw, self.kernel, self.stride, self.pad, self.filters
        if p:
            Xp = self._buffer("pad", B, (H + 2 * p, W + 2 * p, C), zeros=True)  # the border stays 0
            Xp[:, p:p + H, p:p + W] = X
        else:
            Xp = X
        cols = self._buffer("cols", B, (Ho, Wo, k, k, C))
        Xp = np.ascontiguousarray(Xp)
        e = Xp.itemsize
        for i in range(k):  # one copy per kernel row: the k*C values of taps (i, 0..k-1) are contiguous in Xp
            rows = as_strided(Xp[:, i:], (B, Ho, Wo, k * C), (Xp.strides[0], s * Xp.strides[1], s * C * e, e),
                              writeable=False)
            np.copyto(cols[:, :, :, i].reshape(B, Ho, Wo, k * C), rows)
        out = self._buffer("out", B, (Ho, Wo, F))
        np.dot(cols.reshape(B * Ho * Wo, k * k * C), self.params["W"].reshape(k * k * C, F),
               out=out.reshape(B * Ho * Wo, F))
        if self.bias:
            out += self.params["b"]
        self._b = B if train_mode else None
        return out

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        B = self._b
        if B is None:
            raise RuntimeError("backward() needs a forward() in train mode first (and no eval forward since)")
        (H, W, C), (Ho, Wo), k, s, p, F = self.in_shape, self.out_hw, self.kernel, self.stride, self.pad, self.filters
        cols = self._bufs["cols"][:B]
        cols2 = cols.reshape(B * Ho * Wo, k * k * C)
        dY2 = np.ascontiguousarray(dY).reshape(B * Ho * Wo, F)
        np.dot(cols2.T, dY2, out=self.grads["W"].reshape(k * k * C, F))
        if self.bias:
            np.sum(dY2, axis=0, out=self.grads["b"])
        self._b = None
        if not self.needs_input_grad:
            return None
        np.dot(dY2, self.params["W"].reshape(k * k * C, F).T, out=cols2)  # dcols, over the columns
        dXp = self._buffer("dpad", B, (H + 2 * p, W + 2 * p, C))
        dXp.fill(0)
        for i in range(k):
            for j in range(k):
                dXp[:, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s, :] += cols[:, :, :, i, j, :]
        return dXp[:, p:p + H, p:p + W] if p else dXp

    def config(self) -> dict[str, Any]:
        cfg = {"type": "Conv2D", "filters": self.filters, "kernel": self.kernel, "stride": self.stride,
               "padding": self.padding, "init": self.init}
        return cfg if self.bias else {**cfg, "bias": False}  # configs of biased layers as before
