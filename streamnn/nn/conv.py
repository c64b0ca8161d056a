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

Kernels (``algo``, recorded in a model's config; a layer or model saved without it is ``"im2col"``):

* ``"im2col"``: the above over the whole batch, one product each.
* ``"blocked"``: the same sums over blocks of about ``BLOCK_ROWS`` output pixels (:func:`blocks`)
  on the worker threads of :func:`streamnn.threads.run_blocks`; the column matrix ends with a
  column of ones when the layer has a bias, whose weight row is ``b``. Per block ``blk``::

      Y_blk = [cols_blk, 1] @ [W2; b]        [dW; db] = sum over blk of [cols_blk, 1]^T @ dY_blk

  (the partial sums added in block order), and for a stride-1 convolution the input gradient as
  a "full" convolution of the zero-padded output gradient with the flipped kernel, in blocks of
  input rows (``q = k - 1 - p``)::

      dYq = dY zero-padded by q;   Wf[i, j, f, c] = W[k-1-i, k-1-j, c, f]
      dX_blk = im2col(dYq)_blk @ Wf.reshape(k*k*F, C)

  (a stride-2 convolution scatters each block of whole images' ``dY @ W2^T`` as above).

Buffers are reused across steps: a layer's output and gradients are valid until its next
forward. Why the kernels and buffers are built so: docs/performance.md, "The CNN step".

Initialization: He, ``N(0, 2 / (k*k*C))``, biases zero (draws as in :mod:`.dense`).
``bias=False`` drops ``b`` (for a convolution followed by a batch norm: the norm subtracts the
per-channel mean, so a bias has no effect there and its gradient is exactly zero).
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from streamnn.errors import StreamnnError
from streamnn.nn.dense import initial_weights
from streamnn.nn.module import Layer, Shape
from streamnn.threads import run_blocks

PADDINGS = ("same", "valid")
ALGOS = ("im2col", "blocked")
#: Output pixels (column-matrix rows) per block of the "blocked" kernel (:func:`blocks`). It fixes how
#: the weight gradient is summed, so it is part of that kernel's numbers: never change it.
BLOCK_ROWS = 1024
#: Below this many input values per kernel row (k*C), the blocked kernel stores its columns transposed.
TRANSPOSE_BELOW = 16


def conv_output_size(n: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a convolution along one axis."""
    return (n + 2 * pad - kernel) // stride + 1


def kernel_rows(Xp: np.ndarray, k: int, s: int, Ho: int, Wo: int) -> list[np.ndarray]:
    """For each kernel row i, the read-only view ``rows[n, y, x] = Xp[n, s*y + i, s*x : s*x + k, :]``
    (B, Ho, Wo, k*C): for each output pixel the k*C values of taps (i, 0..k-1), one contiguous run
    of ``Xp`` when its rows are contiguous. Slicing the views by image and output row is free."""
    B, C, e = Xp.shape[0], Xp.shape[3], Xp.itemsize
    return [as_strided(Xp[:, i:], (B, Ho, Wo, k * C), (Xp.strides[0], s * Xp.strides[1], s * C * e, e),
                       writeable=False) for i in range(k)]


def copy_columns(rows: list[np.ndarray], cols: np.ndarray) -> None:
    """``cols[(n, y, x), (i, j, c)] = rows[i][n, y, x, (j, c)]`` into the first k*k*C columns of the
    matrix ``cols`` (its rows may be longer): one copy per kernel row."""
    B, Ho, Wo, kc = rows[0].shape
    for i, view in enumerate(rows):
        np.copyto(cols[:, i * kc:(i + 1) * kc].reshape(B, Ho, Wo, kc), view)


def im2col(Xp: np.ndarray, cols: np.ndarray, k: int, s: int, Ho: int, Wo: int) -> None:
    """``cols[(n, y, x), (i, j, c)] = Xp[n, s*y + i, s*x + j, c]`` (see :func:`kernel_rows`)."""
    copy_columns(kernel_rows(Xp, k, s, Ho, Wo), cols)


def blocks(B: int, rows: int, width: int) -> list[tuple[int, int, int, int]]:
    """Blocks ``(b0, b1, y0, y1)`` of about BLOCK_ROWS pixels of a batch of B images of ``rows`` x
    ``width`` pixels: groups of whole images, or bands of rows of one image when an image is larger."""
    per_image = rows * width
    if per_image <= BLOCK_ROWS:
        nb = BLOCK_ROWS // per_image
        return [(b0, min(B, b0 + nb), 0, rows) for b0 in range(0, B, nb)]
    band = max(1, BLOCK_ROWS // width)
    return [(b, b + 1, y0, min(rows, y0 + band)) for b in range(B) for y0 in range(0, rows, band)]


def col2im(cols: np.ndarray, dXp: np.ndarray, k: int, s: int, Ho: int, Wo: int) -> None:
    """``dXp = 0``, then ``dXp[:, s*y + i, s*x + j] += cols[(n, y, x), (i, j, :)]`` tap by tap (never
    np.add.at), for a C-contiguous column matrix ``cols``."""
    B, C = dXp.shape[0], dXp.shape[3]
    taps = cols.reshape(B, Ho, Wo, k, k, C)
    dXp.fill(0)
    for i in range(k):
        for j in range(k):
            dXp[:, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s, :] += taps[:, :, :, i, j, :]


class Conv2D(Layer):
    """``filters`` k x k convolutions of NHWC images, stride 1 or 2, "same" or "valid" padding."""

    decay = ("W",)
    short_name = "conv"

    def __init__(self, filters: int, kernel: int = 3, stride: int = 1, padding: str = "same",
                 init: str = "he", bias: bool = True, algo: str = "im2col") -> None:
        super().__init__()
        if int(filters) < 1 or int(kernel) < 1 or int(stride) < 1:
            raise StreamnnError(f"Conv2D needs positive filters, kernel and stride, got {filters}, {kernel}, {stride}")
        if padding not in PADDINGS:
            raise StreamnnError(f"padding must be 'same' or 'valid', not {padding!r}")
        if algo not in ALGOS:
            raise StreamnnError(f"Conv2D algo must be one of {', '.join(ALGOS)}, not {algo!r}")
        self.algo = algo
        self.filters, self.kernel, self.stride, self.padding, self.init = (
            int(filters), int(kernel), int(stride), padding, init)
        self.pad = self.kernel // 2 if padding == "same" else 0
        self.bias = bool(bias)  # False before a batch norm, whose mean subtraction cancels any bias
        self._bufs: dict[str, np.ndarray] = {}
        self._local = threading.local()  # the "blocked" kernel's buffers of each worker thread
        self._b: int | None = None  # rows of the last train-mode forward (0: an empty rank's share)

    @property
    def uses_workers(self) -> bool:
        """Whether the layer splits its batches into blocks on the worker threads (:mod:`streamnn.threads`)."""
        return self.algo == "blocked"

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
        self._bufs, self._local = {}, threading.local()
        return (*self.out_hw, self.filters)

    def _buffer(self, name: str, B: int, shape: tuple[int, ...], zeros: bool = False) -> np.ndarray:
        """A reused buffer of at least B rows (grown when a larger batch comes), sliced to B."""
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < B:
            buf = self._bufs[name] = (np.zeros if zeros else np.empty)((B, *shape), self.dtype)
        return buf[:B]

    def _scratch(self, name: str, shape: tuple[int, ...], zeros: bool = False) -> np.ndarray:
        """A buffer of the calling worker thread, reused while its shape holds."""
        bufs = self._local.__dict__
        buf = bufs.get(name)
        if buf is None or buf.shape != shape:
            buf = bufs[name] = (np.zeros if zeros else np.empty)(shape, self.dtype)
        return buf

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        if self.algo == "blocked":
            return self._forward_blocked(X, train_mode)
        B = X.shape[0]
        (H, W, C), (Ho, Wo), k, s, p, F = self.in_shape, self.out_hw, self.kernel, self.stride, self.pad, self.filters
        if p:
            Xp = self._buffer("pad", B, (H + 2 * p, W + 2 * p, C), zeros=True)  # the border stays 0
            Xp[:, p:p + H, p:p + W] = X
        else:
            Xp = X
        cols = self._buffer("cols", B * Ho * Wo, (k * k * C,))
        im2col(np.ascontiguousarray(Xp), cols, k, s, Ho, Wo)
        out = self._buffer("out", B, (Ho, Wo, F))
        np.dot(cols, self.params["W"].reshape(k * k * C, F), out=out.reshape(B * Ho * Wo, F))
        if self.bias:
            out += self.params["b"]
        self._b = B if train_mode else None
        return out

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        B = self._b
        if B is None:
            raise RuntimeError("backward() needs a forward() in train mode first (and no eval forward since)")
        if self.algo == "blocked":
            return self._backward_blocked(dY, B)
        (H, W, C), (Ho, Wo), k, s, p, F = self.in_shape, self.out_hw, self.kernel, self.stride, self.pad, self.filters
        cols2 = self._bufs["cols"][:B * Ho * Wo]
        dY2 = np.ascontiguousarray(dY).reshape(B * Ho * Wo, F)
        np.dot(cols2.T, dY2, out=self.grads["W"].reshape(k * k * C, F))
        if self.bias:
            np.sum(dY2, axis=0, out=self.grads["b"])
        self._b = None
        if not self.needs_input_grad:
            return None
        np.dot(dY2, self.params["W"].reshape(k * k * C, F).T, out=cols2)  # dcols, over the columns
        dXp = self._buffer("dpad", B, (H + 2 * p, W + 2 * p, C))
        col2im(cols2, dXp, k, s, Ho, Wo)
        return dXp[:, p:p + H, p:p + W] if p else dXp

    # -- the "blocked" kernel ------------------------------------------------------------------------
    def _sources(self, Xp: np.ndarray) -> Any:
        """What :meth:`_columns` copies a block's columns from: the kernel-row views of ``Xp``, or for
        few input values per kernel row (``k*C < TRANSPOSE_BELOW``, e.g. the 3 colour channels of a
        first layer) the view ``taps[n, y, i, j, c, x] = Xp[n, s*y + i, s*x + j, c]``."""
        (Ho, Wo), k, s, C = self.out_hw, self.kernel, self.stride, self.in_shape[2]
        if k * C >= TRANSPOSE_BELOW:
            return kernel_rows(Xp, k, s, Ho, Wo)
        sb, sy, e = Xp.strides[0], Xp.strides[1], Xp.itemsize
        return as_strided(Xp, (Xp.shape[0], Ho, k, k, C, Wo), (sb, s * sy, sy, C * e, e, s * C * e), writeable=False)

    def _columns(self, sources: Any, b0: int, b1: int, y0: int, y1: int) -> np.ndarray:
        """The column matrix of the block (images b0:b1, output rows y0:y1) in this thread's buffer:
        k*k*C columns, then a column of ones when the layer has a bias (so that the products add b
        and sum db). With few values per kernel row it is stored transposed (one copy then runs
        along an image row: long runs instead of k*C values at a time) and returned as its
        transpose, a view."""
        kkc, rows = self.kernel * self.kernel * self.in_shape[2], (b1 - b0) * (y1 - y0) * self.out_hw[1]
        transposed = not isinstance(sources, list)
        shape = (kkc + self.bias, max(BLOCK_ROWS, rows)) if transposed else (max(BLOCK_ROWS, rows), kkc + self.bias)
        bufs = self._local.__dict__
        cols = bufs.get("cols")
        if cols is None or cols.shape != shape:
            cols = bufs["cols"] = np.empty(shape, self.dtype)
            (cols[kkc:] if transposed else cols[:, kkc:])[...] = 1  # never written by the copies
        if not transposed:
            copy_columns([v[b0:b1, y0:y1] for v in sources], cols[:rows])
            return cols[:rows]
        k, C = self.kernel, self.in_shape[2]
        np.copyto(cols[:kkc, :rows].reshape(k, k, C, b1 - b0, y1 - y0, -1),
                  sources[b0:b1, y0:y1].transpose(2, 3, 4, 0, 1, 5))
        return cols[:, :rows].T

    def _forward_blocked(self, X: np.ndarray, train_mode: bool) -> np.ndarray:
        B = X.shape[0]
        (H, W, C), (Ho, Wo), k, s, p, F = self.in_shape, self.out_hw, self.kernel, self.stride, self.pad, self.filters
        Xp = self._buffer("pad", B, (H + 2 * p, W + 2 * p, C), zeros=True)  # kept for the backward pass
        out = self._buffer("out", B, (Ho, Wo, F))
        Wb = self._buffer("Wb", k * k * C + self.bias, (F,))
        Wb[:k * k * C] = self.params["W"].reshape(k * k * C, F)
        if self.bias:
            Wb[-1] = self.params["b"]
        units = blocks(B, Ho, Wo)

        def pad(b0: int, b1: int) -> None:
            Xp[b0:b1, p:p + H, p:p + W] = X[b0:b1]

        def block(i: int) -> None:
            b0, b1, y0, y1 = units[i]
            if not banded:
                pad(b0, b1)
            np.dot(self._columns(sources, b0, b1, y0, y1), Wb, out=out[b0:b1, y0:y1].reshape(-1, F))

        sources = self._sources(Xp)
        banded = bool(units) and units[0][3] - units[0][2] < Ho  # a band reads its neighbours' rows: pad first
        if banded:
            run_blocks(lambda b: pad(b, b + 1), B)
        run_blocks(block, len(units))
        self._b = B if train_mode else None
        return out

    def _backward_blocked(self, dY: np.ndarray, B: int) -> np.ndarray | None:
        (H, W, C), (Ho, Wo), k, s, p, F = self.in_shape, self.out_hw, self.kernel, self.stride, self.pad, self.filters
        kkc = k * k * C
        Xp, dY = self._bufs["pad"][:B], np.ascontiguousarray(dY)
        units = blocks(B, Ho, Wo)
        parts = self._buffer("parts", len(units), (kkc + self.bias, F))  # [dW; db] of each block
        sources = self._sources(Xp)

        def weights(i: int) -> None:
            b0, b1, y0, y1 = units[i]
            np.dot(self._columns(sources, b0, b1, y0, y1).T, dY[b0:b1, y0:y1].reshape(-1, F), out=parts[i])

        run_blocks(weights, len(units))
        np.sum(parts[:, :kkc], axis=0, out=self.grads["W"].reshape(kkc, F))  # in block order
        if self.bias:
            np.sum(parts[:, kkc], axis=0, out=self.grads["b"])
        self._b = None
        if not self.needs_input_grad:
            return None
        dX = self._buffer("dX", B, (H, W, C))
        if s == 1:
            self._input_gradient_full(dY, dX)
        else:
            self._input_gradient_scattered(dY, dX)
        return dX

    def _input_gradient_full(self, dY: np.ndarray, dX: np.ndarray) -> None:
        """dX = im2col(dY zero-padded by q) @ Wf, in blocks of input rows (stride 1)."""
        (H, W, C), (Ho, Wo), k, p, F = self.in_shape, self.out_hw, self.kernel, self.pad, self.filters
        q = k - 1 - p
        Wf = np.ascontiguousarray(self.params["W"][::-1, ::-1].transpose(0, 1, 3, 2)).reshape(k * k * F, C)
        units = blocks(dX.shape[0], H, W)
        nb, band = (units[0][1] - units[0][0], units[0][3] - units[0][2]) if units else (0, 0)

        def block(i: int) -> None:
            b0, b1, u0, u1 = units[i]
            a0, a1 = u0, u1 + k - 1  # rows of the padded gradient read
            v0, v1 = max(a0, q), max(min(a1, q + Ho), max(a0, q))  # of them, those holding dY
            bufs = self._local.__dict__
            if bufs.get("dYq") is None or bufs["dYq"].shape != (nb, band + k - 1, Wo + 2 * q, F):
                bufs["dYq"] = np.zeros((nb, band + k - 1, Wo + 2 * q, F), self.dtype)
                bufs["dYq rows"] = kernel_rows(bufs["dYq"], k, 1, band, W)
            dYq = bufs["dYq"][:b1 - b0, :a1 - a0]
            dYq[:, :v0 - a0] = 0
            dYq[:, v1 - a0:] = 0
            dYq[:, v0 - a0:v1 - a0, q:q + Wo] = dY[b0:b1, v0 - q:v1 - q]
            cols = self._scratch("colsY", (nb * band * W, k * k * F))[:(b1 - b0) * (u1 - u0) * W]
            copy_columns([v[:b1 - b0, :u1 - u0] for v in bufs["dYq rows"]], cols)
            np.dot(cols, Wf, out=dX[b0:b1, u0:u1].reshape(-1, C))

        run_blocks(block, len(units))

    def _input_gradient_scattered(self, dY: np.ndarray, dX: np.ndarray) -> None:
        """dX from dcols = dY @ W2^T scattered tap by tap (col2im), in blocks of whole images."""
        (H, W, C), (Ho, Wo), k, s, p, F = self.in_shape, self.out_hw, self.kernel, self.stride, self.pad, self.filters
        W2T = self.params["W"].reshape(k * k * C, F).T
        units = blocks(dX.shape[0], 1, Ho * Wo)

        def block(i: int) -> None:
            b0, b1, _, _ = units[i]
            dcols = self._scratch("dcols", ((units[0][1] - units[0][0]) * Ho * Wo, k * k * C))[:(b1 - b0) * Ho * Wo]
            np.dot(dY[b0:b1].reshape(-1, F), W2T, out=dcols)
            dXp = self._scratch("dXp", (units[0][1] - units[0][0], H + 2 * p, W + 2 * p, C))[:b1 - b0]
            col2im(dcols, dXp, k, s, Ho, Wo)
            dX[b0:b1] = dXp[:, p:p + H, p:p + W]

        run_blocks(block, len(units))

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"type": "Conv2D", "filters": self.filters, "kernel": self.kernel,
                               "stride": self.stride, "padding": self.padding, "init": self.init}
        if not self.bias:
            cfg["bias"] = False  # configs of biased layers as before
        if self.algo != "im2col":
            cfg["algo"] = self.algo  # and of the 0.1.0 kernel
        return cfg
