"""Optimizers: gradient descent, momentum, RMSProp and Adam, updating a model in place.

An optimizer holds the model, not copies of its arrays: it updates the model's one flat
parameter buffer in place (:mod:`streamnn.nn.network`), with flat state buffers in the same
order (``state``: ``"m.W0"``, ``"v.W0"``, ... views of them) and ``t`` the steps taken; a step
allocates no parameter-sized memory. The buffer layout and the chunked in-place updates are
described in docs/optimizers.md.

With ``g`` a gradient, ``lr`` the learning rate (an attribute the trainer may set before any
step, e.g. from a schedule) and ``t`` the step number (1 for the first step)::

    GradientDescent   p -= lr g
    Momentum          v = beta v + (1 - beta) g;         p -= lr v
    RMSProp           s = beta s + (1 - beta) g^2;       p -= lr g / (sqrt(s_hat) + eps)
    Adam              m = beta1 m + (1 - beta1) g
                      v = beta2 v + (1 - beta2) g^2;     p -= lr m_hat / (sqrt(v_hat) + eps)

with the bias corrections ``m_hat = m / (1 - beta1^t)``, ``v_hat = v / (1 - beta2^t)``,
``s_hat = s / (1 - beta^t)`` on by default (``bias_correction=False`` uses m, v, s as they are).

Momentum convention: the velocity is an exponential moving average of the gradients (the
tutorial's and Andrew Ng's course convention), not PyTorch's sum ``v = beta v + g``; the
two are the same method with ``lr`` scaled by ``1 - beta``. As in the tutorial, momentum has
no bias correction. RMSProp adds ``eps`` outside the square root, as Adam does (the
tutorial's RMSProp added it inside).

``weight_decay`` is decoupled weight decay (as in AdamW), applied to every parameter before
the update: ``p -= lr * weight_decay * p``. It is separate from the model's L2 term, which is
part of the gradient.

``state_dict()`` is flat: ``"t"``, ``"lr"`` and one array per buffer and parameter;
``load_state_dict`` checks names, shapes and dtypes against the model before changing
anything. ``config()`` gives the arguments of :func:`make_optimizer`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from streamnn.errors import StreamnnError, check_array_like

# Entries updated at a time: an update makes about a dozen passes over its arrays, and
# chunks this size keep them in cache between passes (bit-identical to whole arrays).
CHUNK = 1 << 16


def _ema(avg: np.ndarray, x: np.ndarray, beta: float, tmp: np.ndarray) -> None:
    """avg = beta avg + (1 - beta) x, in place (``tmp`` may be ``x`` itself)."""
    np.multiply(x, 1 - beta, out=tmp)
    avg *= beta
    avg += tmp


class Optimizer:
    """What every optimizer shares: the model, lr, t, buffers, weight decay and state."""

    name = ""
    buffers: tuple[str, ...] = ()  # per-parameter state, e.g. ("m", "v")

    def __init__(self, model: Any, lr: float, *, weight_decay: float = 0.0) -> None:
        self.model = model
        self.lr = _check("lr", lr, low=0)
        self.weight_decay = _check("weight_decay", weight_decay, low=0)
        self.t = 0
        segments = _segments(model)
        # one flat buffer per state buffer, like the model's; "m.W0" etc. name views into it
        self._flat_buffers = [[np.zeros_like(flat_p) for _ in self.buffers] for _, flat_p, _ in segments]
        self.state: dict[str, np.ndarray] = {}
        for (names, _, _), flats in zip(segments, self._flat_buffers):
            for buf, flat in zip(self.buffers, flats):
                offset = 0
                for name in names:
                    p = model.params[name]
                    self.state[f"{buf}.{name}"] = flat[offset:offset + p.size].reshape(p.shape)
                    offset += p.size
        largest = max((flat_p for _, flat_p, _ in segments), key=np.size)
        self._scratch = np.empty(min(largest.size, CHUNK), largest.dtype)

    def zero_grad(self) -> None:
        """Set the model's gradients to zero (``backward`` overwrites them anyway)."""
        for _, _, flat_g in _segments(self.model):
            flat_g.fill(0)

    def step(self, part: slice | None = None) -> None:
        """One update of every model parameter from its gradient, chunk by chunk.

        ``part``: update only the entries ``part`` of the model's flat buffer (data-parallel
        training updates one slice per rank, then the ranks gather the parameters); the state
        buffers outside it are then left behind until :attr:`flat_state` is gathered too.
        """
        self.t += 1
        lr = float(self.lr)
        for (_, flat_p, flat_g), flats in zip(_segments(self.model), self._flat_buffers):
            lo, hi = (0, flat_p.size) if part is None else (part.start, part.stop)
            for start in range(lo, hi, CHUNK):
                part = slice(start, min(start + CHUNK, hi))
                p_part = flat_p[part]
                if self.weight_decay:
                    p_part *= 1 - lr * self.weight_decay
                self._update(p_part, flat_g[part], lr, self._scratch[:p_part.size],
                             *(buf[part] for buf in flats))

    def _update(self, p: np.ndarray, g: np.ndarray, lr: float, tmp: np.ndarray,
                *buffers: np.ndarray) -> None:
        """Update ``p`` in place from ``g``, with ``tmp`` as scratch and the buffers as state."""
        raise NotImplementedError

    @property
    def flat_state(self) -> list[np.ndarray]:
        """The flat state buffers (``m``, ``v``, ...), laid out like the model's flat buffer."""
        return [flat for flats in self._flat_buffers for flat in flats]

    def config(self) -> dict[str, Any]:
        """Keyword arguments of :func:`make_optimizer` that rebuild this optimizer."""
        return {"name": self.name, "lr": float(self.lr), "weight_decay": self.weight_decay}

    def state_dict(self) -> dict[str, Any]:
        """``{"t": int, "lr": float, "<buffer>.<param>": array copy, ...}``."""
        return {"t": self.t, "lr": float(self.lr),
                **{key: buf.copy() for key, buf in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, after checking it against the model's parameters."""
        expected = ["t", "lr", *self.state]
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise StreamnnError(f"{self.name} optimizer state does not match the model: "
                                f"missing {missing}, unexpected {unexpected}")
        t = state["t"]
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
            raise StreamnnError(f"optimizer state 't' must be an integer >= 0, got {t!r}")
        try:
            lr = _check("lr", state["lr"], low=0)
        except StreamnnError as exc:
            raise StreamnnError(f"optimizer state: {exc}") from None
        for key, buf in self.state.items():
            check_array_like(f"optimizer state {key!r}", state[key], buf)
        for key, buf in self.state.items():
            np.copyto(buf, state[key])
        self.t = int(t)
        self.lr = lr


class GradientDescent(Optimizer):
    """p -= lr g."""

    name = "sgd"

    def _update(self, p: np.ndarray, g: np.ndarray, lr: float, tmp: np.ndarray) -> None:
        np.multiply(g, lr, out=tmp)
        p -= tmp


class Momentum(Optimizer):
    """v = beta v + (1 - beta) g;  p -= lr v."""

    name = "momentum"
    buffers = ("v",)

    def __init__(self, model: Any, lr: float, beta: float = 0.9, *,
                 weight_decay: float = 0.0) -> None:
        super().__init__(model, lr, weight_decay=weight_decay)
        self.beta = _check("beta", beta, low=0, high=1)

    def _update(self, p: np.ndarray, g: np.ndarray, lr: float, tmp: np.ndarray,
                v: np.ndarray) -> None:
        _ema(v, g, self.beta, tmp)
        np.multiply(v, lr, out=tmp)
        p -= tmp

    def config(self) -> dict[str, Any]:
        return {**super().config(), "beta": self.beta}


class RMSProp(Optimizer):
    """s = beta s + (1 - beta) g^2;  p -= lr g / (sqrt(s_hat) + eps)."""

    name = "rmsprop"
    buffers = ("s",)

    def __init__(self, model: Any, lr: float, beta: float = 0.999, eps: float = 1e-8, *,
                 bias_correction: bool = True, weight_decay: float = 0.0) -> None:
        super().__init__(model, lr, weight_decay=weight_decay)
        self.beta = _check("beta", beta, low=0, high=1)
        self.eps = _check("eps", eps, low=0, open_low=True)
        self.bias_correction = bool(bias_correction)

    def _update(self, p: np.ndarray, g: np.ndarray, lr: float, tmp: np.ndarray,
                s: np.ndarray) -> None:
        np.square(g, out=tmp)
        _ema(s, tmp, self.beta, tmp)
        c = 1 - self.beta ** self.t if self.bias_correction else 1.0
        # lr g / (sqrt(s / c) + eps) = lr sqrt(c) g / (sqrt(s) + eps sqrt(c))
        np.sqrt(s, out=tmp)
        tmp += self.eps * math.sqrt(c)
        np.divide(g, tmp, out=tmp)
        tmp *= lr * math.sqrt(c)
        p -= tmp

    def config(self) -> dict[str, Any]:
        return {**super().config(), "beta": self.beta, "eps": self.eps,
                "bias_correction": self.bias_correction}


class Adam(Optimizer):
    """m, v moving averages of g and g^2;  p -= lr m_hat / (sqrt(v_hat) + eps)."""

    name = "adam"
    buffers = ("m", "v")

    def __init__(self, model: Any, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, bias_correction: bool = True, *,
                 weight_decay: float = 0.0) -> None:
        super().__init__(model, lr, weight_decay=weight_decay)
        self.beta1 = _check("beta1", beta1, low=0, high=1)
        self.beta2 = _check("beta2", beta2, low=0, high=1)
        self.eps = _check("eps", eps, low=0, open_low=True)
        self.bias_correction = bool(bias_correction)

    def _update(self, p: np.ndarray, g: np.ndarray, lr: float, tmp: np.ndarray,
                m: np.ndarray, v: np.ndarray) -> None:
        _ema(m, g, self.beta1, tmp)
        np.square(g, out=tmp)
        _ema(v, tmp, self.beta2, tmp)
        c1, c2 = ((1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t)
                  if self.bias_correction else (1.0, 1.0))
        # lr (m / c1) / (sqrt(v / c2) + eps) = (lr sqrt(c2) / c1) m / (sqrt(v) + eps sqrt(c2))
        np.sqrt(v, out=tmp)
        tmp += self.eps * math.sqrt(c2)
        np.divide(m, tmp, out=tmp)
        tmp *= lr * math.sqrt(c2) / c1
        p -= tmp

    def config(self) -> dict[str, Any]:
        return {**super().config(), "beta1": self.beta1, "beta2": self.beta2,
                "eps": self.eps, "bias_correction": self.bias_correction}


def _segments(model: Any) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    """(parameter names, flat params, flat grads) to update: the model's one flat buffer when
    it has one (``flat_params`` / ``flat_grads``), else each parameter on its own, looked up
    by name at every step."""
    flat_p, flat_g = getattr(model, "flat_params", None), getattr(model, "flat_grads", None)
    if flat_p is not None and flat_g is not None:
        return [(list(model.params), flat_p, flat_g)]
    return [([name], p.reshape(-1), model.grads[name].reshape(-1)) for name, p in model.params.items()]


def _check(name: str, value: Any, *, low: float, high: float = math.inf,
           open_low: bool = False) -> float:
    """``value`` as a finite float in [low, high), or (low, high) with ``open_low``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise StreamnnError(f"{name} must be a number, got {value!r}") from None
    if not (x > low if open_low else x >= low) or not x < high or not math.isfinite(x):
        bound = f"{'(' if open_low else '['}{low}, {high})"
        raise StreamnnError(f"{name} must be in {bound}, got {value!r}")
    return x


OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (GradientDescent, Momentum, RMSProp, Adam)}


def make_optimizer(name: str, model: Any, lr: float, **kw: Any) -> Optimizer:
    """An optimizer by name ("sgd", "momentum", "rmsprop", "adam") for ``model``."""
    if name not in OPTIMIZERS:
        raise StreamnnError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    try:
        return OPTIMIZERS[name](model, lr, **kw)
    except TypeError as exc:
        raise StreamnnError(f"bad {name} optimizer arguments: {exc}") from None
