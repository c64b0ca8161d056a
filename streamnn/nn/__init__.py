"""Layers as modules: the protocol, the layers, and :class:`Network` (layers + loss head).

One file per layer family, the equations in each docstring: :mod:`.module` (protocol,
``Sequential``, the flat buffer), :mod:`.dense`, :mod:`.activations`, :mod:`.dropout`,
:mod:`.conv`, :mod:`.pool` (max / global average pooling, flatten), :mod:`.norm` (batch
norm), :mod:`.network` (the model: layers, loss head, L2, flat buffers).
"""
from __future__ import annotations

from typing import Any

from ..errors import StreamnnError
from .activations import Activation
from .conv import Conv2D
from .dense import Dense
from .dropout import Dropout
from .module import Layer, Sequential
from .network import Network
from .norm import BatchNorm
from .pool import Flatten, GlobalAvgPool2D, MaxPool2D

LAYERS: dict[str, type[Layer]] = {cls.__name__: cls for cls in (
    Activation, BatchNorm, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D, MaxPool2D)}


def layer_from_config(cfg: dict[str, Any]) -> Layer:
    """Rebuild a layer (unbuilt) from its ``config()``."""
    kwargs = dict(cfg)
    kind = kwargs.pop("type", None)
    if kind not in LAYERS:
        raise StreamnnError(f"unknown layer type {kind!r}; choose from {sorted(LAYERS)}")
    try:
        return LAYERS[kind](**kwargs)
    except TypeError as exc:
        raise StreamnnError(f"bad {kind} layer config: {exc}") from None


__all__ = ["LAYERS", "Activation", "BatchNorm", "Conv2D", "Dense", "Dropout", "Flatten", "GlobalAvgPool2D", "Layer",
           "MaxPool2D", "Network", "Sequential", "layer_from_config"]
