"""Learning-rate schedules: pure functions of the (possibly fractional) epoch.

Design. A schedule is a formula ``lr(epoch)`` with the initial rate ``lr0`` and a few named
parameters; it keeps no state, so resuming needs only its :meth:`Schedule.config`. The
formulas (``e`` is the epoch, >= 0, fractions allowed)::

    constant      lr0
    hyperbolic    lr0 / (1 + decay e)                        (the tutorial's decay)
    step          lr0 factor^floor(e / every)                (drops by ``factor`` every N epochs)
    exponential   lr0 factor^e
    cosine        min_lr + (lr0 - min_lr) (1 + cos(pi min(e, total_epochs) / total_epochs)) / 2

``make_schedule(name, lr0, **params)`` checks the parameters and their ranges; the schedule
is called as ``sched(epoch)``, and ``make_schedule(**sched.config())`` rebuilds it.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from streamnn.errors import StreamnnError


def constant(lr0: float, epoch: float) -> float:
    """lr0."""
    return lr0


def hyperbolic(lr0: float, epoch: float, *, decay: float) -> float:
    """lr0 / (1 + decay epoch)."""
    return lr0 / (1 + decay * epoch)


def step(lr0: float, epoch: float, *, every: float, factor: float = 0.1) -> float:
    """lr0 factor^floor(epoch / every)."""
    return lr0 * factor ** math.floor(epoch / every)


def exponential(lr0: float, epoch: float, *, factor: float) -> float:
    """lr0 factor^epoch."""
    return lr0 * factor ** epoch


def cosine(lr0: float, epoch: float, *, total_epochs: float, min_lr: float = 0.0) -> float:
    """Half a cosine from lr0 down to min_lr over total_epochs, then min_lr."""
    progress = min(epoch, total_epochs) / total_epochs
    return min_lr + (lr0 - min_lr) * (1 + math.cos(math.pi * progress)) / 2


FORMULAS: dict[str, Callable[..., float]] = {
    f.__name__: f for f in (constant, hyperbolic, step, exponential, cosine)}

# Allowed range of each parameter: (low, high, low end included).
_RANGES = {"decay": (0.0, math.inf, True), "every": (0.0, math.inf, False),
           "factor": (0.0, 1.0, False), "total_epochs": (0.0, math.inf, False),
           "min_lr": (0.0, math.inf, True)}


@dataclass(frozen=True)
class Schedule:
    """``FORMULAS[name](lr0, epoch, **params)`` as a callable of the epoch."""

    name: str
    lr0: float
    params: dict[str, float] = field(default_factory=dict)

    def __call__(self, epoch: float) -> float:
        if not epoch >= 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return FORMULAS[self.name](self.lr0, epoch, **self.params)

    def config(self) -> dict[str, Any]:
        """Keyword arguments of :func:`make_schedule` that rebuild this schedule."""
        return {"name": self.name, "lr0": self.lr0, **self.params}


def make_schedule(name: str, lr0: float, **params: float) -> Schedule:
    """The schedule ``name`` starting at ``lr0``; see the module docstring for parameters."""
    if name not in FORMULAS:
        raise StreamnnError(f"unknown schedule {name!r}; choose from {sorted(FORMULAS)}")
    try:
        bound = inspect.signature(FORMULAS[name]).bind(lr0, 0.0, **params)
    except TypeError as exc:
        raise StreamnnError(f"bad {name} schedule parameters: {exc}") from None
    bound.apply_defaults()
    values = {key: _number(key, value) for key, value in bound.arguments.items()
              if key != "epoch"}
    if not values["lr0"] >= 0:
        raise StreamnnError(f"lr0 must be >= 0, got {lr0!r}")
    for key, value in values.items():
        low, high, closed = _RANGES.get(key, (-math.inf, math.inf, True))
        if not ((value >= low if closed else value > low) and value <= high):
            raise StreamnnError(f"{name} schedule: {key} must be in "
                                f"{'[' if closed else '('}{low}, {high}], got {value}")
    if values.get("min_lr", 0.0) > values["lr0"]:
        raise StreamnnError(f"cosine schedule: min_lr {values['min_lr']} is above lr0 "
                            f"{values['lr0']}")
    lr0 = values.pop("lr0")
    return Schedule(name, lr0, values)


def _number(key: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise StreamnnError(f"schedule parameter {key} must be a number, "
                            f"got {value!r}") from None
    if not math.isfinite(x):
        raise StreamnnError(f"schedule parameter {key} must be finite, got {value!r}")
    return x
