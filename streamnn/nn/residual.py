"""A residual block: ``Y = X + F(X)``, F a stack of layers that keeps the shape (He et al., 2016).

    forward:   Y = X + F(X)
    backward:  dX = dY + dF(X)/dX^T dY       (the identity path adds dY unchanged)

``Residual(layers)`` runs ``layers`` as a :class:`~streamnn.nn.module.Sequential` (named as a
network names its layers: ``conv0``, ``bn0``, ...); its parameters, gradients and state are the
inner layers', as ``<inner name>.<param>`` (``res0.conv0.W`` in a network). The flat-buffer
rebinding of :func:`~streamnn.nn.module.bind_flat` reaches the inner layers: the block's
``params`` / ``grads`` dicts pass every assignment on to the layer that owns the array. F's
output shape must equal its input's. ``config()`` holds the inner layers' configs.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from streamnn.errors import StreamnnError
from streamnn.nn.module import Layer, Sequential, Shape


class _Owned(dict):
    """A dict of arrays whose assignments also rebind the owning layer's entry (see the module docstring)."""

    def __init__(self, owners: dict[str, tuple[dict[str, np.ndarray], str]]) -> None:
        super().__init__({key: d[name] for key, (d, name) in owners.items()})
        self._owners = owners

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        d, name = self._owners[key]
        d[name] = value
        super().__setitem__(key, value)


class Residual(Layer):
    """``X + F(X)`` for F = ``layers`` (layer objects or their configs)."""

    short_name = "res"

    def __init__(self, layers: list[Any]) -> None:
        super().__init__()
        from streamnn.nn import layer_from_config

        built = [layer if isinstance(layer, Layer) else layer_from_config(layer) for layer in layers]
        if not built:
            raise StreamnnError("Residual needs at least one layer")
        self.inner = Sequential(built)

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: np.dtype) -> Shape:
        super().build(input_shape, rng, dtype)
        shape = self.inner.build(input_shape, rng, dtype)
        if tuple(shape) != tuple(input_shape):
            raise StreamnnError(f"a Residual block must keep the shape: {tuple(input_shape)} became {tuple(shape)}")
        named = list(self.inner.named_layers())
        self.params = _Owned({f"{n}.{k}": (layer.params, k) for n, layer in named for k in layer.params})
        self.grads = _Owned({f"{n}.{k}": (layer.grads, k) for n, layer in named for k in layer.grads})
        self.decay = tuple(self.inner.decay_names)
        return tuple(input_shape)

    @property
    def state(self) -> dict[str, np.ndarray]:
        return self.inner.state

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        return X + self.inner.forward(X, train_mode)

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        self.inner.needs_input_grad = self.needs_input_grad
        dF = self.inner.backward(dY.copy())  # inner layers may overwrite their dY in place
        return None if not self.needs_input_grad else dY + dF

    def config(self) -> dict[str, Any]:
        return {"type": "Residual", "layers": [layer.config() for layer in self.inner.layers]}
