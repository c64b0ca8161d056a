"""streamnn: NumPy neural networks trained on image datasets streamed from HDF5.

Modules, one concept each: ``store`` (the HDF5 format), ``pack`` (image folders to a
store), ``loader`` (shuffled mini-batches), ``models`` / ``optim`` / ``schedules``
(the NumPy maths), ``checkpoint`` and ``train`` (resumable training), ``cli`` (commands).
"""
__version__ = "0.1.0"

# __version__ comes first: store, checkpoint and train import it from this package.
# matplotlib is not imported here: plotting lives in ``streamnn.plots``, imported on use.
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .decode import load_image  # noqa: E402
from .errors import StreamnnError  # noqa: E402
from .gradcheck import gradient_check  # noqa: E402
from .loader import Loader  # noqa: E402
from .models import DeepNetwork, LogisticRegression  # noqa: E402
from .optim import Adam, GradientDescent, Momentum, RMSProp, make_optimizer  # noqa: E402
from .schedules import make_schedule  # noqa: E402
from .store import Store, StoreWriter, open_store  # noqa: E402
from .train import Trainer  # noqa: E402

__all__ = [
    "Adam", "DeepNetwork", "GradientDescent", "Loader", "LogisticRegression", "Momentum", "RMSProp",
    "Store", "StoreWriter", "StreamnnError", "Trainer", "__version__", "gradient_check", "load_checkpoint",
    "load_image", "make_optimizer", "make_schedule", "open_store", "save_checkpoint",
]
