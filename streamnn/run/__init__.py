"""Stage 4: training runs, their files, evaluation and prediction.

:mod:`.config` resolves a run's configuration (the registries of choices); :mod:`.trainer` is
the loop; :mod:`.checkpoint` stores nested dicts in HDF5 and :mod:`.state` lays a run out in
one; :mod:`.folder` knows what a run folder owns and :mod:`.writer` writes it; :mod:`.evaluate`,
:mod:`.metrics` and :mod:`.plots` measure and show.
"""
