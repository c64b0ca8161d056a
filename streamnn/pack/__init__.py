"""Stage 1: image folders to a store (``streamnn-pack``).

:mod:`.decode` reads one image file (bounded, checked); :mod:`.worker` decodes in a worker
process; :mod:`.job` scans the source and writes the store; :mod:`.sharded` packs a sharded
store over ranks.
"""
from streamnn.pack.job import PackResult, pack, prepare_pack, scan_source

__all__ = ["PackResult", "pack", "prepare_pack", "scan_source"]
