"""Thin command-line wrappers over the library; each module is one console script.

The console scripts enter here (``streamnn-train = "streamnn.cli:streamnn_train"``; named
after the commands, not after the modules of :mod:`streamnn.cli`, which would shadow them): this module and
``streamnn/__init__.py`` import nothing heavy, so the interpreter reaches :func:`_run` within
milliseconds, and a Ctrl-C that arrives while the command's module imports numpy,
h5py or OpenCV ends in ``Error: interrupted``, exit 130, no traceback, nothing written.
From then on the command's own error boundary (:func:`streamnn.cli.common.user_errors`) holds.
"""
from __future__ import annotations

import importlib
import signal
import sys
from typing import Any


def _run(name: str) -> None:
    """Import ``streamnn.cli.<name>`` and call its ``main``; an interrupt while importing exits 130.

    Python drops (prints as "Exception ignored in ...") a KeyboardInterrupt that lands in a
    callback of the import machinery, and the import would go on: so during the import SIGINT
    is also remembered, and a remembered one ends the command even if its exception was
    swallowed (the swallowed one is not printed), or turned into another exception (a
    ``RuntimeError`` from class creation). An ignored SIGINT (``nohup``) stays ignored.
    (SIGTERM needs nothing here: until a command installs its handler, its default action ends
    the process at once, without a traceback.)
    """
    try:  # first: an interrupt anywhere in here is caught
        received: list[int] = []
        hook = sys.unraisablehook

        def interrupt(signum: int, frame: Any) -> None:
            received.append(signum)
            raise KeyboardInterrupt

        def unraisable(info: Any) -> None:
            if not (received and isinstance(info.exc_value, KeyboardInterrupt)):
                hook(info)

        sys.unraisablehook = unraisable
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, interrupt)
        main = importlib.import_module(f"{__name__}.{name}").main
        if received:
            raise KeyboardInterrupt
        if signal.getsignal(signal.SIGINT) is interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = hook
    except Exception:
        if not received:  # a real import error
            raise
        sys.stderr.write("Error: interrupted\n")  # the interrupt, turned into another exception
        sys.exit(130)
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)
    main()


def streamnn_pack() -> None:
    """``streamnn-pack``."""
    _run("pack")


def streamnn_info() -> None:
    """``streamnn-info``."""
    _run("info")


def streamnn_train() -> None:
    """``streamnn-train``."""
    _run("train")


def streamnn_eval() -> None:
    """``streamnn-eval``."""
    _run("eval")


def streamnn_predict() -> None:
    """``streamnn-predict``."""
    _run("predict")
