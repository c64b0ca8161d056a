"""The image conventions the framework adapters offer: channel order and dtype, one definition for all.

A store keeps (H, W, C) pixels in BGR order (as OpenCV decodes), read as normalized float32. An
adapter hands them out with ``channels`` "RGB" (the frameworks' usual order) or "BGR" (the
store's own), and ``dtype`` float32 (normalized, standardized if asked) or uint8 (``round(255 x)``
clipped to 0..255: a uint8 store's own bytes). Standardized pixels are not uint8.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from streamnn.errors import StreamnnError

__all__ = ["CHANNELS", "DTYPES", "choice", "chosen", "to_uint8"]

CHANNELS = ("RGB", "BGR")
DTYPES = ("float32", "uint8")


def choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    """``value`` if it is one of ``choices``, else a one-line error naming the setting."""
    if value not in choices:
        raise StreamnnError(f"unknown {name} {value!r} (choose {', '.join(choices)})")
    return str(value)


def chosen(channels: Any, dtype: Any, standardize: bool = False) -> tuple[str, str]:
    """The channel order and the dtype's name asked for, checked; ``dtype``: a name, a NumPy or a
    torch dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        try:
            name = np.dtype(dtype).name
        except (TypeError, ValueError):
            pass
    if name not in DTYPES:
        raise StreamnnError(f"dtype must be {' or '.join(DTYPES)}, got {dtype!r}")
    if standardize and name == "uint8":
        raise StreamnnError("standardized images are not uint8: use dtype float32 with standardize")
    return choice(channels, CHANNELS, "channels"), name


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Normalized float32 pixels -> ``round(255 x)`` clipped to 0..255, in place (still float32)."""
    np.multiply(x, np.float32(255), out=x)
    return np.clip(np.rint(x, out=x), 0, 255, out=x)
