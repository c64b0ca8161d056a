"""The layer protocol and the :class:`Sequential` container.

Design. A layer is one function of its input and its parameters, with the backward rule
next to it (micrograd's ``Module``, numpy-ml's ``LayerBase``)::

    build(input_shape, rng, dtype) -> output_shape   shapes of ONE sample, e.g. (H, W, C)
    forward(X, train_mode) -> Y                       train mode caches what backward needs
    backward(dY) -> dX                                fills ``grads``; dX is None when the
                                                      layer's ``needs_input_grad`` is false
    params / grads        dicts of arrays by short name ("W", "b"), the same shapes
    decay                 names of the params the model's L2 term applies to (weights)
    state / state_dict() / load_state_dict()   non-parameter state (running statistics)
    config()              JSON arguments that rebuild the layer (:func:`layer_from_config`)

Layouts. Dense-like layers read features x batch ``(D, B)`` (the tutorial's layout);
image layers read NHWC ``(B, H, W, C)``. :class:`~streamnn.nn.pool.Flatten` and
:class:`~streamnn.nn.pool.GlobalAvgPool2D` turn images into ``(D, B)``; elementwise layers
(activations, dropout) take either.

Parameters are allocated by ``build`` (drawing from the model's generator, in layer
order) and may afterwards be *rebound* to views into one flat buffer
(:func:`bind_flat`): a layer always reads ``self.params[name]`` at call time and writes its
gradients in place into ``self.grads[name]``, so rebinding never leaves a stale array.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from streamnn.errors import StreamnnError, check_array_like

Shape = tuple[int, ...]


class Layer:
    """Base class: no parameters, no state; subclasses override what they have."""

    decay: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.needs_input_grad = True
        self.dtype = np.dtype(np.float32)

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: np.dtype) -> Shape:
        """Allocate parameters for inputs of ``input_shape`` (one sample); return the output shape."""
        self.dtype = np.dtype(dtype)
        return tuple(input_shape)

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"type": type(self).__name__}

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The live non-parameter state arrays (e.g. running statistics), by short name."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of :attr:`state`."""
        return {k: v.copy() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy ``state`` in, after checking names, shapes and dtypes."""
        live = self.state
        if set(state) != set(live):
            raise StreamnnError(f"layer state has keys {sorted(state)}, expected {sorted(live)}")
        for name, value in state.items():
            check_array_like(f"layer state {name!r}", value, live[name])
        for name, value in state.items():
            np.copyto(live[name], value)


class Sequential(Layer):
    """Layers applied in order; parameters named ``<layer name>.<param>`` (``conv0.W``)."""

    def __init__(self, layers: list[Layer], names: list[str] | None = None) -> None:
        super().__init__()
        self.layers = list(layers)
        self.names = names if names is not None else default_names(self.layers)
        if len(self.names) != len(self.layers) or len(set(self.names)) != len(self.names):
            raise StreamnnError(f"layer names must be unique, one per layer: {self.names}")

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: np.dtype) -> Shape:
        self.dtype = np.dtype(dtype)
        shape = tuple(input_shape)
        for layer in self.layers:
            shape = layer.build(shape, rng, self.dtype)
        self._refresh()
        return shape

    def _refresh(self) -> None:
        self.params = {f"{n}.{k}": v for n, layer in zip(self.names, self.layers) for k, v in layer.params.items()}
        self.grads = {f"{n}.{k}": v for n, layer in zip(self.names, self.layers) for k, v in layer.grads.items()}

    @property
    def decay_names(self) -> list[str]:
        return [f"{n}.{k}" for n, layer in zip(self.names, self.layers) for k in layer.decay]

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        for layer in self.layers:
            X = layer.forward(X, train_mode)
        return X

    def backward(self, dY: np.ndarray) -> np.ndarray | None:
        """Back through every layer; the first one computes its input gradient only if this does."""
        if self.layers:
            self.layers[0].needs_input_grad = self.needs_input_grad
        for layer in reversed(self.layers):
            dY = layer.backward(dY)
        return dY

    def named_layers(self) -> Iterator[tuple[str, Layer]]:
        yield from zip(self.names, self.layers)

    @property
    def state(self) -> dict[str, np.ndarray]:
        return {f"{n}.{k}": v for n, layer in self.named_layers() for k, v in layer.state.items()}


def default_names(layers: list[Layer]) -> list[str]:
    """``<type in lower case><index among that type>``: dense0, relu0, conv0, dense1, ..."""
    counts: dict[str, int] = {}
    names = []
    for layer in layers:
        kind = getattr(layer, "short_name", type(layer).__name__.lower())
        names.append(f"{kind}{counts.get(kind, 0)}")
        counts[kind] = counts.get(kind, 0) + 1
    return names


def bind_flat(layers: list[Layer], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Move every layer's params and grads into two flat buffers (values kept); return them.

    Each ``layer.params[k]`` / ``layer.grads[k]`` becomes a view of ``flat_params`` /
    ``flat_grads`` (C-ordered, in layer order), so an optimizer or an allreduce can work on
    one contiguous array.
    """
    arrays = [(layer, k) for layer in layers for k in layer.params]
    total = sum(layer.params[k].size for layer, k in arrays)
    flat_params, flat_grads = np.empty(total, dtype), np.zeros(total, dtype)
    offset = 0
    for layer, k in arrays:
        p = layer.params[k]
        view_p = flat_params[offset:offset + p.size].reshape(p.shape)
        view_p[...] = p
        layer.params[k] = view_p
        layer.grads[k] = flat_grads[offset:offset + p.size].reshape(p.shape)
        offset += p.size
    return flat_params, flat_grads
