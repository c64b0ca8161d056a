"""streamnn: NumPy neural networks trained on image datasets streamed from HDF5.

Modules, one concept each: ``store`` (the HDF5 format), ``pack`` (image folders to a
store), ``loader`` (shuffled mini-batches), ``models`` / ``optim`` / ``schedules``
(the NumPy maths), ``checkpoint`` and ``train`` (resumable training), ``cli`` (commands).

The public names below are imported lazily, on first use (PEP 562 ``__getattr__``): importing
``streamnn`` costs nothing, so a command's entry point (:mod:`streamnn.cli`) starts at once
and can turn a Ctrl-C during the heavy imports (numpy, h5py) into a clean exit 130.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint", "load_image": "decode",
    "StreamnnError": "errors", "gradient_check": "gradcheck", "Loader": "loader",
    "DeepNetwork": "models", "LogisticRegression": "models", "Adam": "optim", "GradientDescent": "optim",
    "Momentum": "optim", "RMSProp": "optim", "make_optimizer": "optim", "make_schedule": "schedules",
    "Store": "store", "StoreWriter": "store", "open_store": "store", "Trainer": "train",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'streamnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
