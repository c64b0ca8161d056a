"""streamnn: NumPy neural networks trained on image datasets streamed from HDF5.

Packages by pipeline stage: ``pack`` (image folders to a store), ``data`` (the store and its
mini-batches), ``nn`` (layers, losses, models), ``optim`` (optimizers, schedules), ``run``
(training runs, checkpoints, evaluation), ``cli`` (the commands); ``dist`` is the one
communicator (one process or MPI), and ``errors``, ``paths``, ``atomic``, ``rng`` the base.

The public names below are imported lazily, on first use (PEP 562 ``__getattr__``): importing
``streamnn`` costs nothing, so a command's entry point (:mod:`streamnn.cli`) starts at once
and can turn a Ctrl-C during the heavy imports (numpy, h5py) into a clean exit 130.
"""
from __future__ import annotations

from streamnn.lazy import lazy_exports
from streamnn.version import __version__ as __version__

_EXPORTS = {
    "StreamnnError": "errors",
    "Store": "data.store", "StoreWriter": "data.writer", "open_store": "data.store", "Loader": "data.loader",
    "load_image": "pack.decode",
    "DeepNetwork": "nn.models", "LogisticRegression": "nn.models", "ConvNet": "nn.models",
    "gradient_check": "nn.gradcheck",
    "Adam": "optim", "GradientDescent": "optim", "Momentum": "optim", "RMSProp": "optim",
    "make_optimizer": "optim", "make_schedule": "optim",
    "load_checkpoint": "run.checkpoint", "save_checkpoint": "run.checkpoint", "Trainer": "run.trainer",
    "load_model": "run.predict",
}

__all__ = sorted([*_EXPORTS, "__version__"])


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
