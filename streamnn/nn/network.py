"""A trainable model: a :class:`~streamnn.nn.module.Sequential` body, a loss head, L2, one flat buffer.

Design. ``Network(layers, input_shape, output)`` builds the layers for samples of
``input_shape`` (``(D,)`` for a dense net, ``(H, W, C)`` for a conv net) and adds the
output activation fused with its loss (:mod:`streamnn.nn.losses`: sigmoid + binary
cross-entropy for one output, softmax + categorical cross-entropy for K >= 2). Inputs are
always the tutorial's ``X`` = features x batch ``(D, m)``; a conv net reads the same batch
as ``X.T.reshape(m, H, W, C)`` (free for the loader's F-ordered batches). The cost is::

    cost = CE(head(Z), Y) + lambd / (2m) * sum over weights ||W||^2      (lambd = weight_decay)

(in eval mode, a net with image inputs runs ``EVAL_CHUNK`` images at a time, so its
reused layer buffers stay the size of a training batch; an eval forward then ends the
train-mode cache) and ``backward(Y)`` fills ``grads`` with its gradient: the head gives ``dZ = (A - Y) / m``,
the layers back-propagate it (the first layer skips its input gradient), then
``dW += lambd/m W`` for every weight the layers list in ``decay`` (not biases, not batch-norm
scales).

Flat buffers. After building, every parameter and gradient array is a view into
``flat_params`` / ``flat_grads`` (one contiguous array each, in the model's dtype, layer
order): optimizers update the whole model in one pass and data-parallel training can
allreduce ``flat_grads`` with no copy. ``params`` / ``grads`` name the views
(``conv0.W``, or the tutorial's ``W0``, ``b0`` for :class:`~streamnn.nn.models.DeepNetwork`).

State. ``state_dict()`` holds copies of the parameters, each layer's state (batch-norm
running statistics, ``bn0.mean``) and the model generator's state under ``"rng"`` (it
drew the initial weights and draws the dropout masks). ``load_state_dict`` checks every
name, shape and dtype before copying anything in. ``config()`` rebuilds the model with
:func:`streamnn.nn.models.from_config`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from streamnn.errors import StreamnnError, check_array_like
from streamnn.nn.losses import LOSSES
from streamnn.rng import make_rng, rng_state, set_rng_state
from streamnn.nn.module import Layer, Sequential, bind_flat

#: The compute dtypes of a model (its parameters, activations and gradients), by name: not the dtypes
#: a store keeps its pixels in (:data:`streamnn.data.format.STORE_DTYPES`).
COMPUTE_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
StateDict = dict[str, Any]
#: Images an eval-mode forward of a conv net processes at a time (bounds its buffers).
EVAL_CHUNK = 64


def model_dtype_of(dtype: Any) -> np.dtype:
    """float32 or float64, else StreamnnError."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved not in COMPUTE_DTYPES.values():
        raise StreamnnError(f"dtype must be {' or '.join(COMPUTE_DTYPES)}, not {dtype!r}")
    return resolved


class Network:
    """Layers + loss head for samples of ``input_shape``; see the module docstring."""

    #: Label smoothing ``eps`` in [0, 1): the cost and its gradient take the targets ``Y (1 - eps) + eps / K``
    #: (K classes; 2 for one sigmoid output); accuracy the labels. A training setting, not in ``config()``.
    label_smoothing = 0.0

    def __init__(self, layers: Sequence[Layer], input_shape: Sequence[int], output: str = "sigmoid", *,
                 dtype: Any = np.float32, weight_decay: float = 0.0, seed: int = 0,
                 names: list[str] | None = None) -> None:
        self.dtype = model_dtype_of(dtype)
        self.weight_decay = float(weight_decay)
        if not self.weight_decay >= 0 or not math.isfinite(self.weight_decay):
            raise StreamnnError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if output not in LOSSES:
            raise StreamnnError(f"the output must be 'sigmoid' or 'softmax', not {output!r}")
        self.output = output
        self.seed = int(seed)
        self.input_shape = tuple(int(s) for s in input_shape)
        if not self.input_shape or min(self.input_shape) < 1:
            raise StreamnnError(f"input_shape must be positive sizes, got {self.input_shape}")
        self.n_features = math.prod(self.input_shape)
        self._loss = LOSSES[output]
        self.rng = make_rng(self.seed)
        self.body = Sequential(list(layers), names)
        out_shape = self.body.build(self.input_shape, self.rng, self.dtype)
        if len(out_shape) != 1:
            raise StreamnnError(f"the last layer must give flat outputs, not samples of shape {out_shape}")
        self.n_classes = int(out_shape[0])
        if output == "sigmoid" and self.n_classes != 1:
            raise StreamnnError(f"a sigmoid output has 1 neuron, not {self.n_classes}; use softmax for more classes")
        if output == "softmax" and self.n_classes < 2:
            raise StreamnnError("a softmax output needs at least 2 neurons")
        self.flat_params, self.flat_grads = bind_flat(self.body.layers, self.dtype)
        self.body._refresh()
        self.body.needs_input_grad = False  # nothing needs the gradient of the input images
        self.params = {self._public(k): v for k, v in self.body.params.items()}
        self.grads = {self._public(k): v for k, v in self.body.grads.items()}
        self._decayed = [self._public(k) for k in self.body.decay_names]
        item = self.flat_params.itemsize
        self._decay_spans = [(start, start + self.params[k].size) for k in self._decayed
                             for start in [(self.params[k].__array_interface__["data"][0]
                                            - self.flat_params.__array_interface__["data"][0]) // item]]
        largest = max((self.params[k].size for k in self._decayed), default=0)
        # dW += lambd/m W goes through this buffer, so no weight-sized array is allocated per step.
        self._decay_buffer = np.empty(largest if self.weight_decay else 0, self.dtype)
        self._output: np.ndarray | None = None  # probabilities of the last train-mode forward
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (Y_hat, logits) of the last forward

    def _public(self, name: str) -> str:
        """The name a parameter is known by (``dense0.W``); subclasses may keep older names."""
        return name

    @property
    def layers(self) -> list[Layer]:
        return self.body.layers

    # -- the maths ----------------------------------------------------------------------
    def forward(self, X: np.ndarray, train_mode: bool = True, share: tuple[int, int, int] | None = None) -> np.ndarray:
        """Output probabilities (K x m) for inputs X (D x m); train mode caches for backward.

        ``share = (rank, world_size, m_global)``: X holds the columns ``rank::world_size`` of a
        global batch of ``m_global`` (data-parallel training); per-row draws (dropout) are those
        of the global batch, so every rank draws what one process would.
        """
        for layer in self.layers:
            if hasattr(layer, "share"):
                layer.share = share
        A = np.asarray(X, dtype=self.dtype)
        if A.ndim != 2 or A.shape[0] != self.n_features:
            raise StreamnnError(f"input must be {self.n_features} features x batch, got shape {A.shape}")
        if len(self.input_shape) > 1:
            A = A.T.reshape(A.shape[1], *self.input_shape)
        if train_mode or len(self.input_shape) == 1:
            Z = self.body.forward(A, train_mode)
        else:  # image layers reuse their buffers: eval in chunks, and forget the train-mode cache
            self._output = None
            Z = np.concatenate([self.body.forward(A[i:i + EVAL_CHUNK], False)
                                for i in range(0, max(len(A), 1), EVAL_CHUNK)], axis=1)
        Y_hat = self._loss.output(Z)
        self._last = (Y_hat, Z)
        if train_mode:
            self._output = Y_hat
        return Y_hat

    def backward(self, Y: np.ndarray, count: int | None = None, decay: bool = True) -> None:
        """Fill ``grads`` with the gradient of the mean cost of the last train-mode forward.

        Data-parallel training passes the global batch's ``count`` (the mean's divisor) and
        ``decay=False``, sums the ranks' gradients, then calls :meth:`add_weight_decay` once.
        """
        if self._output is None:
            raise RuntimeError("backward() needs a forward() in train mode first")
        Y = self._labels(Y, self._output.shape)
        m = Y.shape[1] if count is None else int(count)
        self.body.backward(self._loss.gradient(self._output, self._targets(Y), m))
        if decay:
            self.add_weight_decay(m)

    def add_weight_decay(self, m: int, part: slice | None = None) -> None:
        """``grads[W] += lambd/m W`` for every decayed weight (the L2 term's gradient); ``part``:
        only for the entries ``part`` of the flat buffers (a data-parallel rank's slice)."""
        if not self.weight_decay:
            return
        lo, hi = (0, self.flat_params.size) if part is None else (part.start, part.stop)
        for start, stop in self._decay_spans:
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                self.flat_grads[a:b] += np.multiply(self.flat_params[a:b], self.weight_decay / m,
                                                    out=self._decay_buffer[:b - a])

    def _labels(self, Y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        Y = np.asarray(Y, dtype=self.dtype)
        if Y.shape != shape:
            raise StreamnnError(f"labels must have shape {shape}, got {Y.shape}")
        return Y

    def _targets(self, Y: np.ndarray) -> np.ndarray:
        """The labels, smoothed by :attr:`label_smoothing` (the labels themselves when it is 0)."""
        eps = self.label_smoothing
        return Y if not eps else Y * self.dtype.type(1 - eps) + self.dtype.type(eps / max(self.n_classes, 2))

    def loss(self, Y: np.ndarray, Y_hat: np.ndarray) -> float:
        """Mean cross-entropy plus the L2 term lambd/(2m) sum ||W||^2.

        Uses the logits of the forward pass that returned ``Y_hat`` (exact for saturated
        outputs); other probabilities fall back to clipped probabilities.
        """
        Y_hat = np.asarray(Y_hat)
        Y = self._labels(Y, Y_hat.shape)
        T = self._targets(Y)
        if self._last is not None and Y_hat is self._last[0]:
            cross_entropy = self._loss.from_logits(self._last[1], T)
        else:
            cross_entropy = self._loss.from_probabilities(Y_hat.astype(self.dtype), T)
        return cross_entropy + self._l2_cost(Y.shape[1])

    def loss_sum(self, Y: np.ndarray) -> np.floating:
        """Summed cross-entropy (model dtype) of the last forward pass, from its logits."""
        if self._last is None:
            raise RuntimeError("loss_sum() needs a forward() first")
        return self._loss.sum_from_logits(self._last[1], self._targets(self._labels(Y, self._last[0].shape)))

    def mean_loss(self, loss_sum: float, m: int) -> float:
        """The cross-entropy part of :meth:`loss`, from a (reduced) :meth:`loss_sum` over a batch of ``m``."""
        return float(self.dtype.type(loss_sum) / m)

    def l2_cost(self, m: int) -> float:
        """The L2 part of :meth:`loss`: lambd/(2m) sum ||W||^2."""
        return self._l2_cost(m)

    def _l2_cost(self, m: int) -> float:
        if not self.weight_decay:
            return 0.0
        squares = sum(float(np.vdot(self.params[k], self.params[k])) for k in self._decayed)
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
        """JSON-serialisable arguments that rebuild this model with ``models.from_config``."""
        return {"type": "Network", "layers": [layer.config() for layer in self.layers], "names": self.body.names,
                "input_shape": list(self.input_shape), "output": self.output, "dtype": self.dtype.name,
                "weight_decay": self.weight_decay, "seed": self.seed}

    def _live_state(self) -> dict[str, np.ndarray]:
        return {self._public(k): v for k, v in self.body.state.items()}

    def state_dict(self) -> StateDict:
        """Copies of the parameters and layer states, and the generator state under ``"rng"`` (JSON)."""
        state: StateDict = {name: p.copy() for name, p in self.params.items()}
        state.update({name: s.copy() for name, s in self._live_state().items()})
        state["rng"] = rng_state(self.rng)
        return state

    def load_state_dict(self, state: StateDict) -> None:
        """Copy a :meth:`state_dict` in, after checking every name, shape and dtype."""
        arrays = {**self.params, **self._live_state()}
        expected = [*arrays, "rng"]
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise StreamnnError(f"model state does not match the model: missing {missing}, "
                                f"unexpected {unexpected}")
        for name, a in arrays.items():
            check_array_like(f"model state {name!r}", state[name], a)
        probe = make_rng(0)
        try:
            set_rng_state(probe, state["rng"])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StreamnnError(f"model state 'rng' is not a valid generator state: {exc}") from None
        for name, a in arrays.items():
            np.copyto(a, state[name])
        set_rng_state(self.rng, state["rng"])
        self._output = None
        self._last = None
