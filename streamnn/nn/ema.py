"""An exponential moving average of a model's weights, kept beside its optimizer (``--ema DECAY``).

After every optimizer step ``t``::

    average = decay * average + (1 - decay) * params_t          (average_0 = the initial params)

:class:`WeightAverage` wraps an optimizer (same ``step`` / ``zero_grad`` / ``lr`` / state
protocol) and keeps ``average`` laid out like the model's flat parameter buffer. The update of
step t is applied when the average is next needed (the next ``zero_grad``, :func:`averaged`,
``state_dict``): in data-parallel training a rank's ``step`` updates only its slice of the
parameters and the ranks gather them afterwards, so every rank then updates the whole average
from the same gathered parameters, with the same numbers. ``state_dict`` holds it under
``"ema"``, so a resumed run continues it exactly.

:func:`averaged` puts the average into the model for a while (evaluation, the best checkpoint)
and the trained weights back afterwards; with a plain optimizer it does nothing. BatchNorm's
running statistics are the trained model's (they are not averaged).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from streamnn.errors import StreamnnError, check_array_like


class WeightAverage:
    """``optimizer`` plus an exponential moving average of the weights it trains (see the module docstring)."""

    def __init__(self, optimizer: Any, decay: float) -> None:
        if not 0 < float(decay) < 1:
            raise StreamnnError(f"the weight average's decay must be in (0, 1), not {decay}")
        self.inner, self.decay = optimizer, float(decay)
        self.model = optimizer.model
        self.average = self.model.flat_params.copy()
        self._pending = False

    lr = property(lambda self: self.inner.lr, lambda self, value: setattr(self.inner, "lr", value))
    t = property(lambda self: self.inner.t)
    name = property(lambda self: self.inner.name)
    flat_state = property(lambda self: self.inner.flat_state)  # the average is whole on every rank

    def __getattr__(self, name: str) -> Any:  # anything else: the optimizer's
        return getattr(self.__dict__["inner"], name)

    def zero_grad(self) -> None:
        self.flush()
        self.inner.zero_grad()

    def step(self, part: slice | None = None) -> None:
        self.flush()
        self.inner.step(part)
        self._pending = True

    def flush(self) -> None:
        """Apply the pending update (the parameters of the last step are now complete on every rank)."""
        if self._pending:
            self.average *= self.decay
            self.average += (1 - self.decay) * self.model.flat_params
            self._pending = False

    def config(self) -> dict[str, Any]:
        return {**self.inner.config(), "ema": self.decay}

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return {**self.inner.state_dict(), "ema": self.average.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "ema" not in state:
            raise StreamnnError("optimizer state has no 'ema' (the weight average): the checkpoint was trained "
                                "without --ema")
        check_array_like("optimizer state 'ema'", state["ema"], self.average)
        average = state.pop("ema")
        self.inner.load_state_dict(state)
        np.copyto(self.average, average)
        self._pending = False


def with_average(optimizer: Any, decay: float) -> Any:
    """``optimizer`` wrapped in a :class:`WeightAverage` when ``decay`` > 0, else itself."""
    return WeightAverage(optimizer, decay) if decay else optimizer


@contextlib.contextmanager
def averaged(optimizer: Any) -> Iterator[None]:
    """The model holds the weight average inside the block (nothing changes for a plain optimizer)."""
    if not isinstance(optimizer, WeightAverage):
        yield
        return
    optimizer.flush()
    params = optimizer.model.flat_params
    trained = params.copy()
    np.copyto(params, optimizer.average)
    try:
        yield
    finally:
        np.copyto(params, trained)
