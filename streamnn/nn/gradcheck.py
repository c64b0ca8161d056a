"""Gradient checking: analytic gradients against centered finite differences, in float64.

Design. For every parameter entry ``theta`` the numerical derivative is::

    (J(theta + eps) - J(theta - eps)) / (2 eps)      J = model.loss(Y, model.forward(X))

and each parameter array gets the relative error (Andrew Ng's course)::

    ||analytic - numerical||_2 / (||analytic||_2 + ||numerical||_2)

:func:`gradient_check` reports the largest of them; :func:`gradient_errors` gives them all.
A parameter whose true gradient is zero has no meaningful relative error (the rounding in
``J(theta + eps) - J(theta - eps)`` alone gives about 1): check at a point where the
gradients do not vanish, e.g. with random rather than zero biases.

:func:`layer_gradient_errors` checks one layer on its own (parameters and the input
gradient) through the scalar ``J = sum(R * layer.forward(X))`` for a fixed random ``R``,
whose gradient with respect to the output is ``R``.

Any model with ``params`` / ``grads`` (dicts of arrays by name), ``forward(X, train_mode)``,
``backward(Y)``, ``loss(Y, Y_hat)`` and a generator ``rng`` can be checked, with any loss it
computes. A model that is not float64 is checked through a float64 copy (rebuilt with
:func:`streamnn.nn.models.from_config` from its ``config()`` and ``state_dict()``); a float64
model is perturbed in place and left with its parameters and generator state unchanged.
Forward passes run in train mode (``backward`` needs one). The generator is rewound before
every evaluation, so every pass draws the same dropout masks: the masks are held fixed.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from streamnn.nn.models import from_config
from streamnn.rng import make_rng, rng_state, set_rng_state


def relative_error(analytic: np.ndarray, numerical: np.ndarray) -> float:
    """||a - n|| / (||a|| + ||n||), and 0 when both are zero."""
    scale = np.linalg.norm(analytic) + np.linalg.norm(numerical)
    return float(np.linalg.norm(analytic - numerical) / scale) if scale else 0.0


def as_float64(model: Any) -> Any:
    """The model itself if all its parameters are float64, else a float64 copy."""
    if all(p.dtype == np.float64 for p in model.params.values()):
        return model
    copy = from_config({**model.config(), "dtype": "float64"})
    copy.load_state_dict({k: v.astype(np.float64) if isinstance(v, np.ndarray) else v
                          for k, v in model.state_dict().items()})
    return copy


def _numerical(flat: np.ndarray, entries: Any, cost: Any, eps: float) -> np.ndarray:
    """Centered differences of ``cost()`` for the given entries of ``flat`` (a view into what cost reads)."""
    numerical = np.empty(len(entries))
    for j, i in enumerate(entries):
        theta = flat[i]
        flat[i] = theta + eps
        plus = cost()
        flat[i] = theta - eps
        minus = cost()
        flat[i] = theta
        numerical[j] = (plus - minus) / (2 * eps)
    return numerical


def gradient_errors(model: Any, X: np.ndarray, Y: np.ndarray, eps: float = 1e-5, *,
                    max_entries: int | None = None,
                    seed: int = 0) -> dict[str, float]:
    """Relative error of each parameter's gradient.

    ``max_entries`` checks at most that many entries of each parameter, chosen at random
    (generator seeded by ``seed``); ``None`` checks them all.
    """
    model = as_float64(model)
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    start = rng_state(model.rng)

    def cost() -> float:
        set_rng_state(model.rng, start)
        return model.loss(Y, model.forward(X, train_mode=True))

    cost()
    model.backward(Y)
    pick = make_rng(seed)
    errors = {}
    for name, p in model.params.items():
        flat = p.reshape(-1)  # a view: writing to it perturbs the parameter
        entries = np.arange(p.size)
        if max_entries is not None and p.size > max_entries:
            entries = pick.choice(p.size, max_entries, replace=False)
        numerical = _numerical(flat, entries, cost, eps)
        errors[name] = relative_error(model.grads[name].reshape(-1)[entries], numerical)
    set_rng_state(model.rng, start)
    return errors


def gradient_check(model: Any, X: np.ndarray, Y: np.ndarray, eps: float = 1e-5, *,
                   max_entries: int | None = None,
                   seed: int = 0) -> float:
    """The largest relative error over the model's parameters (see :func:`gradient_errors`)."""
    return max(gradient_errors(model, X, Y, eps, max_entries=max_entries, seed=seed).values())


def layer_gradient_errors(layer: Any, X: np.ndarray, eps: float = 1e-5, *, seed: int = 0) -> dict[str, float]:
    """Relative error of a built float64 layer's parameter gradients and of its input gradient ("input").

    A layer drawing random numbers (dropout) has its generator rewound before every pass.
    """
    X = np.array(X, np.float64)
    rng = getattr(layer, "rng", None)
    start = rng_state(rng) if rng is not None else None

    def run(x: np.ndarray) -> np.ndarray:
        if rng is not None:
            set_rng_state(rng, start)
        return np.array(layer.forward(x, True), np.float64)

    R = make_rng(seed).standard_normal(run(X).shape)

    def cost() -> float:
        return float(np.sum(R * run(X)))

    cost()
    layer.needs_input_grad = True
    dX = np.array(layer.backward(R.copy()))
    errors = {name: g.copy() for name, g in layer.grads.items()}
    for name, p in layer.params.items():
        errors[name] = relative_error(errors[name].reshape(-1), _numerical(p.reshape(-1), range(p.size), cost, eps))
    errors["input"] = relative_error(dX.reshape(-1), _numerical(X.reshape(-1), range(X.size), cost, eps))
    return {name: float(e) for name, e in errors.items()}
