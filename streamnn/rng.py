"""Seeded random generators whose state can be saved without pickle.

Every random draw in streamnn comes from an explicit ``numpy.random.Generator``. Its state
(``bit_generator.state``, a dict holding 128-bit integers) is saved as a JSON string, which
checkpoints store as a plain HDF5 string attribute.
"""
from __future__ import annotations

import json

import numpy as np


def make_rng(seed: int | None) -> np.random.Generator:
    """A PCG64 generator from an integer seed."""
    return np.random.Generator(np.random.PCG64(seed))


def rng_state(rng: np.random.Generator) -> str:
    """The generator's full state as a JSON string."""
    return json.dumps(rng.bit_generator.state, sort_keys=True)


def set_rng_state(rng: np.random.Generator, state: str) -> None:
    """Restore a state produced by :func:`rng_state` (same bit generator kind)."""
    decoded = json.loads(state)
    if decoded.get("bit_generator") != type(rng.bit_generator).__name__:
        raise ValueError(f"random state is for {decoded.get('bit_generator')!r}, "
                         f"not {type(rng.bit_generator).__name__!r}")
    rng.bit_generator.state = decoded
