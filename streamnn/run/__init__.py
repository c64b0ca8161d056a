"""Stage 4: training runs, their files, evaluation and prediction.

:mod:`.config` resolves a run's configuration (the registries of choices), :mod:`.modelkinds`
holds the ``--model`` kinds and :mod:`.selection` the validation split and early stopping;
:mod:`.trainer` is the loop, :mod:`.stop` its agreed stops and :mod:`.console` its output;
:mod:`.checkpoint` stores nested dicts in HDF5 and :mod:`.state` lays a run out in one; :mod:`.folder` knows what
a run folder owns and :mod:`.writer` writes it; :mod:`.predict` applies a checkpoint to images,
:mod:`.evaluate`, :mod:`.metrics` and :mod:`.plots` measure and show.
"""
