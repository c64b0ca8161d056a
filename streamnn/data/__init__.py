"""Stage 2: the store (its format, reading and writing) and the mini-batches streamed from it.

:mod:`.store` opens and checks a store; :mod:`.readers` reads rows by index (memory map,
``pread``, HDF5); :mod:`.shards` makes a sharded store read as one; :mod:`.order` draws the
epochs' orders and the ranks' shares; :mod:`.transforms` standardizes and augments;
:mod:`.loader` streams shuffled mini-batches.
"""
