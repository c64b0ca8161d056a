"""The models users build by name: logistic regression, deep (dense) networks, conv nets.

Design. Each model is a :class:`streamnn.nn.Network` (layers + loss head + one flat
parameter buffer; the maths is in :mod:`streamnn.nn` and each layer's docstring) built
from the tutorial's arguments. The tutorial's conventions hold: ``X`` is features x batch
(``D x m``), labels ``Y`` are ``1 x m`` of 0/1 for a sigmoid output or ``K x m`` one-hot
for a softmax output, and the cost is the mean cross-entropy plus
``lambd / (2m) * sum ||W||^2`` (``lambd = weight_decay``).

* :class:`DeepNetwork` ``(neuron_cnt = [D, h1, ..., K], activation_func)``: for every hidden
  layer ``Dense -> activation -> Dropout`` (dropout only when ``dropout > 0``), then the
  output ``Dense``. Weights He-initialized before ReLU-family activations, Xavier before
  saturating ones and the output; its parameters keep the tutorial's names ``W0, b0, W1,
  ...`` (so checkpoints of earlier releases load unchanged) and its numbers are those of
  the earlier flat implementation for the same seed: the same draws in the same order.
* :class:`LogisticRegression` ``(n_features)``: one sigmoid neuron with zero initial
  weights (the loss is convex: no symmetry to break).
* :class:`ConvNet`: for every entry of ``conv``, ``Conv2D(filters, kernel, "same")`` [->
  ``BatchNorm``] -> ``MaxPool2D(2)`` -> ReLU; then ``Flatten``, the dense hidden layers
  (``Dense -> ReLU -> Dropout``) and the output ``Dense``. Max-pooling and ReLU commute
  (``relu(max(x)) = max(relu(x))``, and the pool's gradient goes to the same first maximum
  either way), so pooling first gives the same numbers as the usual ReLU -> pool, bit for
  bit, with the ReLU and its backward over a quarter of the values. ``conv_bias=False`` drops
  the convolutions' biases (what training does before a batch norm, where they have no effect:
  ``streamnn.run.config``; models saved with biases keep them). ``head="gap"`` replaces the
  ``Flatten`` by a ``GlobalAvgPool2D`` (each channel's mean over the last block's pixels, so the
  first dense layer sees ``conv[-1]`` features instead of ``H W conv[-1]``: far fewer weights);
  ``head="flatten"``, the default, is absent from ``config()``, so configs of earlier models
  are unchanged and load as before. ``conv_algo`` is the convolutions'
  kernel (:mod:`streamnn.nn.conv`): ``"im2col"``, that of models saved without it, or ``"blocked"``.

Any other stack of layers is a plain :class:`~streamnn.nn.Network`; :func:`from_config`
rebuilds all of them from ``config()``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from streamnn.nn.functional import ACTIVATIONS
from streamnn.errors import StreamnnError
from streamnn.nn.losses import LOSSES
from streamnn.nn import (Activation, BatchNorm, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D, Layer, MaxPool2D,
                         Network, layer_from_config)
from streamnn.nn.network import COMPUTE_DTYPES

#: The ConvNet heads: how the last conv block's images become the dense layers' features.
HEADS: dict[str, type[Layer]] = {"flatten": Flatten, "gap": GlobalAvgPool2D}

__all__ = ["COMPUTE_DTYPES", "HEADS", "ConvNet", "DeepNetwork", "LogisticRegression", "Network", "from_config"]


class DeepNetwork(Network):
    """A fully connected network, ``neuron_cnt = [D, h1, ..., K]``, one activation a layer."""

    def __init__(self, neuron_cnt: Sequence[int], activation_func: Sequence[str], *,
                 dtype: Any = np.float32, weight_decay: float = 0.0, dropout: float = 0.0,
                 seed: int = 0) -> None:
        self.neuron_cnt = [int(n) for n in neuron_cnt]
        self.activation_func = [str(name) for name in activation_func]
        self.dropout = float(dropout)
        _validate(self.neuron_cnt, self.activation_func, self.dropout)
        self.n_layers = len(self.neuron_cnt) - 1
        layers: list[Layer] = []
        for units, act in zip(self.neuron_cnt[1:-1], self.activation_func[:-1]):
            layers += [Dense(units, self._init(ACTIVATIONS[act].init)), Activation(act)]
            if self.dropout > 0:
                layers.append(Dropout(self.dropout))
        layers.append(Dense(self.neuron_cnt[-1], self._init("xavier")))
        super().__init__(layers, [self.neuron_cnt[0]], self.activation_func[-1], dtype=dtype,
                         weight_decay=weight_decay, seed=seed)

    def _init(self, init: str) -> str:
        return init

    def _public(self, name: str) -> str:
        """dense<l>.W -> W<l>, dense<l>.b -> b<l>: the tutorial's names."""
        layer, _, key = name.partition(".")
        return f"{key}{layer[len('dense'):]}" if layer.startswith("dense") else name

    def config(self) -> dict[str, Any]:
        return {"type": "DeepNetwork", "neuron_cnt": list(self.neuron_cnt),
                "activation_func": list(self.activation_func), "dtype": self.dtype.name,
                "weight_decay": self.weight_decay, "dropout": self.dropout, "seed": self.seed}


def _validate(n: list[int], acts: list[str], dropout: float) -> None:
    if len(n) < 2 or min(n) < 1:
        raise StreamnnError(f"neuron_cnt must list at least 2 positive sizes, got {n}")
    if len(acts) != len(n) - 1:
        raise StreamnnError(f"activation_func needs {len(n) - 1} names (one per layer), got {len(acts)}")
    for name in acts[:-1]:
        if name not in ACTIVATIONS:
            raise StreamnnError(f"unknown hidden activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    if acts[-1] not in LOSSES:
        raise StreamnnError(f"the last activation must be 'sigmoid' or 'softmax', not {acts[-1]!r}")
    if not 0 <= dropout < 1:
        raise StreamnnError(f"dropout (drop probability) must be in [0, 1), got {dropout}")


class LogisticRegression(DeepNetwork):
    """One sigmoid neuron, ``p = sigmoid(W x + b)``, with zero initial weights."""

    def __init__(self, n_features: int, *, dtype: Any = np.float32,
                 weight_decay: float = 0.0, seed: int = 0) -> None:
        super().__init__([n_features, 1], ["sigmoid"], dtype=dtype, weight_decay=weight_decay, seed=seed)

    def _init(self, init: str) -> str:
        return "zeros"

    def config(self) -> dict[str, Any]:
        return {"type": "LogisticRegression", "n_features": self.neuron_cnt[0],
                "dtype": self.dtype.name, "weight_decay": self.weight_decay, "seed": self.seed}


class ConvNet(Network):
    """Conv blocks (``Conv2D`` [-> ``BatchNorm``] -> ``MaxPool2D`` -> ReLU), flatten or GAP, then dense layers."""

    def __init__(self, image_shape: Sequence[int], conv: Sequence[int], hidden: Sequence[int], n_classes: int, *,
                 kernel: int = 3, batch_norm: bool = False, dtype: Any = np.float32, weight_decay: float = 0.0,
                 dropout: float = 0.0, seed: int = 0, conv_bias: bool = True, head: str = "flatten",
                 conv_algo: str = "im2col") -> None:
        self.image_shape = [int(s) for s in image_shape]
        self.conv, self.hidden = [int(c) for c in conv], [int(h) for h in hidden]
        self.kernel, self.batch_norm, self.dropout = int(kernel), bool(batch_norm), float(dropout)
        self.conv_bias, self.head, self.conv_algo = bool(conv_bias), str(head), str(conv_algo)
        if self.head not in HEADS:
            raise StreamnnError(f"unknown ConvNet head {head!r}; choose from {', '.join(HEADS)}")
        if len(self.image_shape) != 3:
            raise StreamnnError(f"a ConvNet needs an image shape (H, W, C), not {self.image_shape}")
        if min(self.conv + self.hidden, default=1) < 1 or int(n_classes) < 2:
            raise StreamnnError(f"conv and hidden sizes must be positive and n_classes >= 2: {self.conv}, "
                                f"{self.hidden}, {n_classes}")
        if not 0 <= self.dropout < 1:
            raise StreamnnError(f"dropout (drop probability) must be in [0, 1), got {self.dropout}")
        h, w = self.image_shape[:2]
        if min(h, w) < 2 ** len(self.conv):
            raise StreamnnError(f"{len(self.conv)} conv blocks halve {h}x{w} images below 1 pixel: use fewer "
                                "--conv entries or larger images")
        layers: list[Layer] = []
        for filters in self.conv:
            layers.append(Conv2D(filters, self.kernel, padding="same", bias=self.conv_bias, algo=self.conv_algo))
            if self.batch_norm:
                layers.append(BatchNorm())
            layers += [MaxPool2D(2), Activation("relu")]  # = relu then pool, on a quarter of the values
        layers.append(HEADS[self.head]())
        for units in self.hidden:
            layers += [Dense(units, "he"), Activation("relu")]
            if self.dropout > 0:
                layers.append(Dropout(self.dropout))
        layers.append(Dense(1 if n_classes == 2 else int(n_classes), "xavier"))
        super().__init__(layers, self.image_shape, "sigmoid" if n_classes == 2 else "softmax", dtype=dtype,
                         weight_decay=weight_decay, seed=seed)

    def config(self) -> dict[str, Any]:
        cfg = {"type": "ConvNet", "image_shape": list(self.image_shape), "conv": list(self.conv),
               "hidden": list(self.hidden), "n_classes": max(self.n_classes, 2), "kernel": self.kernel,
               "batch_norm": self.batch_norm, "dtype": self.dtype.name, "weight_decay": self.weight_decay,
               "dropout": self.dropout, "seed": self.seed}
        if not self.conv_bias:  # configs of earlier models unchanged
            cfg["conv_bias"] = False
        if self.head != "flatten":
            cfg["head"] = self.head
        if self.conv_algo != "im2col":
            cfg["conv_algo"] = self.conv_algo
        return cfg


MODELS: dict[str, type[Network]] = {"ConvNet": ConvNet, "DeepNetwork": DeepNetwork,
                                    "LogisticRegression": LogisticRegression}


def from_config(cfg: dict[str, Any]) -> Network:
    """Rebuild a model (freshly initialized) from its :meth:`config`."""
    kwargs = dict(cfg)
    kind = kwargs.pop("type", None)
    if kind == "Network":
        try:
            layers = [layer_from_config(c) for c in kwargs.pop("layers")]
            return Network(layers, **kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise StreamnnError(f"bad Network config: {exc}") from None
    if kind not in MODELS:
        raise StreamnnError(f"unknown model type {kind!r}; choose from {sorted([*MODELS, 'Network'])}")
    try:
        return MODELS[kind](**kwargs)
    except (TypeError, ValueError) as exc:
        raise StreamnnError(f"bad {kind} config: {exc}") from None
