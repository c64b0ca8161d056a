"""Stage 2: the store (its format, reading and writing) and the mini-batches streamed from it.

:mod:`.format` is the store format (and a sharded store's index); :mod:`.store` opens and checks
a store, :mod:`.writer` writes one; :mod:`.readers` reads rows by index (memory map, ``pread``,
HDF5, a sharded store's shards); :mod:`.order` draws the epochs' orders and the ranks' shares;
:mod:`.transforms` standardizes and augments; :mod:`.loader` streams shuffled mini-batches, which
:mod:`.epoch` makes and prefetches. For the framework adapters: :mod:`.rows` reads a split's rows
by index in whichever process asks, and :mod:`.conventions` is the image conventions they offer.
"""
