"""PyTorch's image conventions for a store's (b, H, W, C) BGR rows, and the tensors that hold them.

``layout``: "NCHW" (b, C, H, W), "NHWC" (b, H, W, C), or "channels_last" (NCHW shape in NHWC
memory, no transposing copy); ``channels``: "RGB" (the store keeps BGR, as OpenCV decodes) or
"BGR"; ``dtype``: float32 (normalized) or uint8 (``round(255 x)``, a uint8 store's own bytes): the
conventions all adapters share (:mod:`streamnn.data.conventions`).
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

from streamnn.data.conventions import choice, chosen, to_uint8
from streamnn.data.readers.base import normalize_into

LAYOUTS = ("NCHW", "NHWC", "channels_last")


def shared(nbytes: int) -> torch.Tensor:
    """A uint8 tensor in new shared memory (inherited by forked workers; sent once as a descriptor
    to spawned ones)."""
    n = max(int(nbytes), 1)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n), 0, (n,))


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor; in a DataLoader worker in shared memory at once (else sending it copies it there)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(max(size, 1)), 0, shape)


class Images:
    """The conventions chosen: (b, H, W, C) BGR images -> (b, C, H, W) or (b, H, W, C), RGB or BGR."""

    def __init__(self, image_shape: tuple[int, ...], layout: str, channels: str, dtype: Any,
                 standardize: bool = False) -> None:
        self.shape = tuple(int(s) for s in image_shape)
        self.layout = choice(layout, LAYOUTS, "layout")
        self.channels, self.dtype = chosen(channels, dtype, standardize)
        h, w, c = self.shape
        #: One image's shape in memory (channels_last: NHWC memory, seen through an NCHW view).
        self.memory = (c, h, w) if self.layout == "NCHW" else (h, w, c)

    def arrange(self, src: np.ndarray, dst: np.ndarray, scale: np.float32 | None = None,
                scratch: np.ndarray | None = None) -> None:
        """(b, H, W, C) BGR images into ``dst`` (b, *memory), cast to dst's dtype, uint8 ``src`` into
        float32 ``dst`` times ``scale`` (the Loader's arithmetic: ``float32(byte) * scale``).

        Where the order changes, OpenCV turns the pixels around first, in one SIMD pass over the
        batch into ``scratch`` (a buffer of dst's size and src's dtype, or a new one): ``cv2.split``
        writes each channel's plane straight into its place in (b, C, H x W) order for NCHW,
        ``cv2.cvtColor`` swaps BGR to RGB for NHWC; then one contiguous pass casts or scales it into
        ``dst`` (:func:`~streamnn.data.readers.base.normalize_into`, the Loader's own); a ``dst`` of
        src's dtype is turned into directly. Measured on
        64 64x64x3 uint8 images: the split 0.03 ms, where NumPy's strided copy per channel took
        0.22-0.28 ms."""
        b, h, w, c = src.shape
        rgb, nchw = self.channels == "RGB" and c == 3, self.layout == "NCHW"
        times = scale is not None and src.dtype == np.uint8 and dst.dtype == np.float32
        pixels = np.ascontiguousarray(src).reshape(b * h * w, 1, c)
        need = b * h * w * c
        if dst.dtype == src.dtype and dst.flags.c_contiguous:
            scratch = dst  # turned straight into place: nothing to cast
        work = scratch.reshape(-1)[:need] if scratch is not None and scratch.dtype == src.dtype else np.empty(need, src.dtype)
        if nchw and c > 1:  # plane j of the split lands in its output channel, (b, C, H x W) order
            order = work.reshape(b, c, h * w)
            cv2.split(pixels.reshape(b, h * w, c), [order[:, c - 1 - j if rgb else j] for j in range(c)])
            pixels = order
        elif rgb:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB, dst=work.reshape(b * h * w, 1, c))
        flat = dst.view()
        flat.shape = pixels.shape  # (an error, never a silent copy, if dst is not contiguous)
        if times:  # the Loader's own conversion
            normalize_into(np.ascontiguousarray(pixels), flat, scale)
        elif not np.may_share_memory(flat, pixels):
            np.copyto(flat, pixels, casting="unsafe")

    def view(self, out: torch.Tensor) -> torch.Tensor:
        """The tensor the user gets from one in memory order (channels_last: the NCHW view)."""
        return out.permute(0, 3, 1, 2) if self.layout == "channels_last" else out

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        """Normalized (b, D) BGR float32 rows (overwritten for uint8) -> a new image tensor."""
        b = len(rows)
        out = empty((b, *self.memory), getattr(torch, self.dtype))
        src = rows.reshape(b, *self.shape)
        self.arrange(to_uint8(src) if self.dtype == "uint8" else src, out.numpy())
        return self.view(out)
