"""Fully connected networks in NumPy: logistic regression and deep networks.

Design. The tutorial's conventions: ``X`` is features x batch (``D x m``), labels ``Y`` are
``1 x m`` of 0/1 for a sigmoid output or ``K x m`` one-hot for a softmax output. Layer
``l = 0 .. L-1`` computes::

    Z[l] = W[l] A[l] + b[l]          A[0] = X
    A[l+1] = g_l(Z[l]) * mask[l] / (1 - dropout)   (mask only on hidden layers, train mode)

and the output is ``sigmoid(Z[L-1])`` or ``softmax(Z[L-1])``. The loss is the mean
cross-entropy over the batch plus the tutorial's L2 term (``lambd = weight_decay``)::

    cost = CE + lambd / (2m) * sum_l ||W[l]||^2

``backward(Y)`` fills ``grads`` with the gradient of that cost. With ``dZ`` the gradient of
the *mean* cost with respect to ``Z`` (so the tutorial's ``1/m`` is applied once, at the
output, ``dZ[L-1] = (A - Y) / m``)::

    dW[l] = dZ[l] A[l]^T + lambd/m W[l]       db[l] = sum over the batch of dZ[l]
    dA[l] = W[l]^T dZ[l]                      dZ[l-1] = g'(Z[l-1]) * dA[l] * mask / (1-p)

``dA[0]`` (the gradient for the input) is never computed.

Parameters live in ``params`` (``W0, b0, W1, b1, ...``) and gradients in ``grads``, the
same names and shapes. Both dicts hold fixed arrays that are updated in place:
``backward`` writes gradients with ``out=``, ``load_state_dict`` copies into the existing
parameters, so references held elsewhere never go stale. Every array is in the model's
dtype (float32 by default, float64 on request); inputs are converted once at the door.

Initialization: He (``N(0, 2/fan_in)``) for relu / leaky_relu layers, Xavier/Glorot
(``N(0, 2/(fan_in + fan_out))``) for tanh / sigmoid / softmax layers, biases zero. Draws are
made in float64 from the model's own ``numpy.random.Generator`` (seeded by ``seed``) and
then rounded, so float32 and float64 models with the same seed start from the same point.
The same generator draws the dropout masks; its state is part of ``state_dict``.

``dropout`` is the probability of *dropping* a hidden unit (inverted dropout, train mode
only). ``loss(Y, Y_hat)`` uses the logits cached by the forward pass that returned
``Y_hat``, so saturated outputs give exact, finite losses; for any other probabilities it
falls back to clipped probabilities (see :mod:`streamnn.losses`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .activations import ACTIVATIONS
from .errors import StreamnnError, check_array_like
from .losses import LOSSES
from .rng import make_rng, rng_state, set_rng_state

DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
StateDict = dict[str, Any]


def _dtype(dtype: Any) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved not in DTYPES.values():
        raise StreamnnError(f"dtype must be float32 or float64, not {dtype!r}")
    return resolved


@dataclass
class _Cache:
    """What a train-mode forward pass keeps for the backward pass."""

    inputs: list[np.ndarray]  # A[l], the input of layer l (after dropout)
    Z: list[np.ndarray]  # hidden pre-activations Z[l]
    A: list[np.ndarray]  # hidden activations g(Z[l]), before dropout
    masks: list[np.ndarray]  # dropout masks, already scaled by 1 / (1 - p)
    output: np.ndarray  # the probabilities A[L]


class DeepNetwork:
    """A fully connected network, ``neuron_cnt = [D, h1, ..., K]``, one activation a layer."""

    def __init__(self, neuron_cnt: Sequence[int], activation_func: Sequence[str], *,
                 dtype: Any = np.float32, weight_decay: float = 0.0, dropout: float = 0.0,
                 seed: int = 0) -> None:
        self.neuron_cnt = [int(n) for n in neuron_cnt]
        self.activation_func = [str(name) for name in activation_func]
        self.dtype = _dtype(dtype)
        self.weight_decay = float(weight_decay)
        self.dropout = float(dropout)
        self.seed = int(seed)
        self._validate()
        self.n_classes = self.neuron_cnt[-1]
        self.n_layers = len(self.neuron_cnt) - 1
        self._hidden = [ACTIVATIONS[name] for name in self.activation_func[:-1]]
        self._loss = LOSSES[self.activation_func[-1]]
        self.rng = make_rng(self.seed)
        self.params: dict[str, np.ndarray] = {}
        for l, (fan_in, fan_out) in enumerate(zip(self.neuron_cnt, self.neuron_cnt[1:])):
            init = self._hidden[l].init if l < len(self._hidden) else "xavier"
            self.params[f"W{l}"] = self._initial_weights(fan_in, fan_out, init)
            self.params[f"b{l}"] = np.zeros((fan_out, 1), self.dtype)
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        # dW += lambd/m W goes through this buffer, so no weight-sized array is allocated.
        self._decay_buffers = ({name: np.empty_like(p) for name, p in self.params.items()
                                if name.startswith("W")} if self.weight_decay else {})
        self._cache: _Cache | None = None
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (Y_hat, logits)

    def _validate(self) -> None:
        n, acts = self.neuron_cnt, self.activation_func
        if len(n) < 2 or min(n) < 1:
            raise StreamnnError(f"neuron_cnt must list at least 2 positive sizes, got {n}")
        if len(acts) != len(n) - 1:
            raise StreamnnError(f"activation_func needs {len(n) - 1} names (one per layer), "
                                f"got {len(acts)}")
        for name in acts[:-1]:
            if name not in ACTIVATIONS:
                raise StreamnnError(f"unknown hidden activation {name!r}; "
                                    f"choose from {sorted(ACTIVATIONS)}")
        if acts[-1] == "sigmoid" and n[-1] != 1:
            raise StreamnnError(f"a sigmoid output has 1 neuron, not {n[-1]}; "
                                "use softmax for more classes")
        if acts[-1] == "softmax" and n[-1] < 2:
            raise StreamnnError("a softmax output needs at least 2 neurons")
        if acts[-1] not in LOSSES:
            raise StreamnnError(f"the last activation must be 'sigmoid' or 'softmax', "
                                f"not {acts[-1]!r}")
        if not self.weight_decay >= 0 or not np.isfinite(self.weight_decay):
            raise StreamnnError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.dropout < 1:
            raise StreamnnError(f"dropout (drop probability) must be in [0, 1), "
                                f"got {self.dropout}")

    def _initial_weights(self, fan_in: int, fan_out: int, init: str) -> np.ndarray:
        var = 2 / fan_in if init == "he" else 2 / (fan_in + fan_out)
        W = self.rng.standard_normal((fan_out, fan_in)) * np.sqrt(var)
        return W.astype(self.dtype)

    # -- the maths ----------------------------------------------------------------------
    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        """Output probabilities (K x m) for inputs X (D x m); train mode caches for backward."""
        A = np.asarray(X, dtype=self.dtype)
        if A.ndim != 2 or A.shape[0] != self.neuron_cnt[0]:
            raise StreamnnError(f"input must be {self.neuron_cnt[0]} features x batch, "
                                f"got shape {A.shape}")
        drop = train_mode and self.dropout > 0
        inputs, Zs, As, masks = [], [], [], []
        for l, act in enumerate(self._hidden):
            inputs.append(A)
            Z = self._affine(l, A)
            A = act.forward(Z)
            Zs.append(Z)
            As.append(A)
            if drop:
                masks.append(self._dropout_mask(A.shape))
                A = A * masks[-1]
        inputs.append(A)
        Z = self._affine(self.n_layers - 1, A)
        Y_hat = self._loss.output(Z)
        self._last = (Y_hat, Z)
        if train_mode:
            self._cache = _Cache(inputs, Zs, As, masks, Y_hat)
        return Y_hat

    def _affine(self, l: int, A: np.ndarray) -> np.ndarray:
        """Z = W A + b."""
        Z = np.dot(self.params[f"W{l}"], A)
        Z += self.params[f"b{l}"]
        return Z

    def _dropout_mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """Inverted dropout: 0 with probability p, 1 / (1 - p) otherwise."""
        keep = (self.rng.random(shape) >= self.dropout).astype(self.dtype)
        keep /= 1 - self.dropout
        return keep

    def backward(self, Y: np.ndarray) -> None:
        """Fill ``grads`` with the gradient of the mean cost of the last train-mode forward."""
        cache = self._cache
        if cache is None:
            raise RuntimeError("backward() needs a forward() in train mode first")
        Y = self._labels(Y, cache.output.shape)
        m = Y.shape[1]
        dZ = self._loss.gradient(cache.output, Y)
        for l in reversed(range(self.n_layers)):
            W, dW, db = self.params[f"W{l}"], self.grads[f"W{l}"], self.grads[f"b{l}"]
            np.dot(dZ, cache.inputs[l].T, out=dW)
            np.sum(dZ, axis=1, keepdims=True, out=db)
            if self.weight_decay:
                dW += np.multiply(W, self.weight_decay / m, out=self._decay_buffers[f"W{l}"])
            if l > 0:
                dA = np.dot(W.T, dZ)
                if cache.masks:
                    dA *= cache.masks[l - 1]
                dZ = self._hidden[l - 1].backward(dA, cache.Z[l - 1], cache.A[l - 1])

    def _labels(self, Y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        Y = np.asarray(Y, dtype=self.dtype)
        if Y.shape != shape:
            raise StreamnnError(f"labels must have shape {shape}, got {Y.shape}")
        return Y

    def loss(self, Y: np.ndarray, Y_hat: np.ndarray) -> float:
        """Mean cross-entropy plus the L2 term lambd/(2m) sum ||W||^2."""
        Y_hat = np.asarray(Y_hat)
        Y = self._labels(Y, Y_hat.shape)
        if self._last is not None and Y_hat is self._last[0]:
            cross_entropy = self._loss.from_logits(self._last[1], Y)
        else:
            cross_entropy = self._loss.from_probabilities(Y_hat.astype(self.dtype), Y)
        return cross_entropy + self._l2_cost(Y.shape[1])

    def _l2_cost(self, m: int) -> float:
        if not self.weight_decay:
            return 0.0
        squares = sum(float(np.vdot(W, W)) for name, W in self.params.items()
                      if name.startswith("W"))
        return self.weight_decay / (2 * m) * squares

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Output probabilities in eval mode (no dropout, nothing cached for backward)."""
        return self.forward(X, train_mode=False)

    def evaluate(self, X: np.ndarray, Y: np.ndarray) -> dict[str, float]:
        """``{"loss": cost, "accuracy": fraction correct}`` in eval mode."""
        Y_hat = self.predict_proba(X)
        return {"loss": self.loss(Y, Y_hat),
                "accuracy": self._loss.accuracy(Y_hat, self._labels(Y, Y_hat.shape))}

    # -- configuration and state --------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-serialisable arguments that rebuild this model with :func:`from_config`."""
        return {"type": "DeepNetwork", "neuron_cnt": list(self.neuron_cnt),
                "activation_func": list(self.activation_func), "dtype": self.dtype.name,
                "weight_decay": self.weight_decay, "dropout": self.dropout, "seed": self.seed}

    def state_dict(self) -> StateDict:
        """Copies of the parameters, and the generator state under ``"rng"`` (JSON)."""
        state: StateDict = {name: p.copy() for name, p in self.params.items()}
        state["rng"] = rng_state(self.rng)
        return state

    def load_state_dict(self, state: StateDict) -> None:
        """Copy a :meth:`state_dict` in, after checking every name, shape and dtype."""
        expected = [*self.params, "rng"]
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise StreamnnError(f"model state does not match the model: missing {missing}, "
                                f"unexpected {unexpected}")
        for name, p in self.params.items():
            check_array_like(f"model state {name!r}", state[name], p)
        probe = make_rng(0)
        try:
            set_rng_state(probe, state["rng"])
        except (ValueError, TypeError, KeyError) as exc:
            raise StreamnnError(f"model state 'rng' is not a valid generator state: {exc}")
        for name, p in self.params.items():
            np.copyto(p, state[name])
        set_rng_state(self.rng, state["rng"])
        self._cache = None
        self._last = None


class LogisticRegression(DeepNetwork):
    """One sigmoid neuron, ``p = sigmoid(W x + b)``, with zero initial weights.

    The loss is convex, so there is no symmetry to break: the weights start at zero as in
    the tutorial. Everything else is the one-layer case of :class:`DeepNetwork`.
    """

    def __init__(self, n_features: int, *, dtype: Any = np.float32,
                 weight_decay: float = 0.0, seed: int = 0) -> None:
        super().__init__([n_features, 1], ["sigmoid"], dtype=dtype,
                         weight_decay=weight_decay, seed=seed)

    def _initial_weights(self, fan_in: int, fan_out: int, init: str) -> np.ndarray:
        return np.zeros((fan_out, fan_in), self.dtype)

    def config(self) -> dict[str, Any]:
        return {"type": "LogisticRegression", "n_features": self.neuron_cnt[0],
                "dtype": self.dtype.name, "weight_decay": self.weight_decay, "seed": self.seed}


MODELS = {"DeepNetwork": DeepNetwork, "LogisticRegression": LogisticRegression}


def from_config(cfg: dict[str, Any]) -> DeepNetwork:
    """Rebuild a model (freshly initialized) from its :meth:`config`."""
    kwargs = dict(cfg)
    kind = kwargs.pop("type", None)
    if kind not in MODELS:
        raise StreamnnError(f"unknown model type {kind!r}; choose from {sorted(MODELS)}")
    try:
        return MODELS[kind](**kwargs)
    except (TypeError, ValueError) as exc:
        raise StreamnnError(f"bad {kind} config: {exc}") from None
