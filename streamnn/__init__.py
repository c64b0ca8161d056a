"""streamnn: NumPy neural networks trained on image datasets streamed from HDF5.

Modules, one concept each: ``store`` (the HDF5 format), ``pack`` (image folders to a
store), ``loader`` (shuffled mini-batches), ``models`` / ``optim`` / ``schedules``
(the NumPy maths), ``checkpoint`` and ``train`` (resumable training), ``cli`` (commands).
"""
__version__ = "0.1.0"

from .errors import StreamnnError  # noqa: E402
from .store import Store, StoreWriter, open_store  # noqa: E402

__all__ = ["Store", "StoreWriter", "StreamnnError", "__version__", "open_store"]
