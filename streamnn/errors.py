"""The one exception type streamnn raises for bad input.

Its message is a single line that names the file (when there is one) and the problem;
the command-line tools print it and exit non-zero.
"""
from __future__ import annotations

import os


class StreamnnError(Exception):
    """Bad input or state, with a one-line, user-facing message."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        text = f"{os.fspath(path)}: {message}" if path is not None else message
        super().__init__(" ".join(text.split()))
