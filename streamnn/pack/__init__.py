"""Stage 1: image folders to a store (``streamnn-pack``).

:mod:`.scan` reads SRC's layout; :mod:`.decode` reads one image file (bounded, checked);
:mod:`.worker` decodes in a worker process and :mod:`.pool` runs the workers; :mod:`.output`
checks and claims OUT; :mod:`.job` writes the store; :mod:`.sharded` packs a sharded store
over ranks.

The public names are imported lazily (PEP 562 ``__getattr__``): a decoding worker imports
:mod:`.worker`, which imports this package, and must not load h5py or the store code.
"""
from __future__ import annotations

from streamnn.lazy import lazy_exports

_EXPORTS = {"PackResult": "job", "pack": "job", "prepare_pack": "job", "scan_source": "scan"}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
