"""Thin command-line wrappers over the library; each module is one console script.

The console scripts enter here (``streamnn-train = "streamnn.cli:train"``): this module and
``streamnn/__init__.py`` import nothing heavy, so the interpreter reaches :func:`_run` within
milliseconds, and a Ctrl-C that arrives while the command's module imports numpy,
h5py or OpenCV ends in ``Error: interrupted``, exit 130, no traceback, nothing written.
From then on the command's own error boundary (:func:`streamnn.cli.common.user_errors`) holds.
"""
from __future__ import annotations

import importlib
import sys


def _run(name: str) -> None:
    """Import ``streamnn.cli.<name>`` and call its ``main``; an interrupt while importing exits 130.

    (SIGTERM needs nothing here: until a command installs its handler, its default action ends
    the process at once, without a traceback.)
    """
    try:
        main = importlib.import_module(f"{__name__}.{name}").main
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)
    main()


def pack() -> None:
    """``streamnn-pack``."""
    _run("pack")


def info() -> None:
    """``streamnn-info``."""
    _run("info")


def train() -> None:
    """``streamnn-train``."""
    _run("train")


def eval() -> None:  # noqa: A001 - the command's name
    """``streamnn-eval``."""
    _run("eval")


def predict() -> None:
    """``streamnn-predict``."""
    _run("predict")
