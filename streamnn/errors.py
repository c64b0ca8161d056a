"""The one exception type streamnn raises for bad input.

Its message is a single line that names the file (when there is one) and the problem;
the command-line tools print it and exit non-zero.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np


class StreamnnError(Exception):
    """Bad input or state, with a one-line, user-facing message."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        text = f"{os.fspath(path)}: {message}" if path is not None else message
        super().__init__(" ".join(text.split()))


def check_array_like(what: str, value: Any, like: np.ndarray) -> None:
    """Raise unless ``value`` is an array of ``like``'s shape and dtype (``what`` names it)."""
    if not isinstance(value, np.ndarray) or value.shape != like.shape or value.dtype != like.dtype:
        got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise StreamnnError(f"{what} must be {like.dtype} {like.shape}, got {got}")
