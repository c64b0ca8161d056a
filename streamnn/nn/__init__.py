"""Layers as modules: the protocol, the layers, and :class:`Network` (layers + loss head).

One file per layer family, the equations in each docstring: :mod:`.module` (protocol,
``Sequential``, the flat buffer), :mod:`.dense`, :mod:`.activations`, :mod:`.dropout`,
:mod:`.conv`, :mod:`.pool` (max / global average pooling, flatten), :mod:`.norm` (batch
norm), :mod:`.residual` (``X + F(X)`` blocks), :mod:`.ema` (a weight average), :mod:`.network` (the model: layers, loss head, L2, flat buffers).
"""
from __future__ import annotations

from typing import Any

from streamnn.errors import StreamnnError
from streamnn.nn.activation import Activation
from streamnn.nn.conv import Conv2D
from streamnn.nn.dense import Dense
from streamnn.nn.dropout import Dropout
from streamnn.nn.module import Layer, Sequential
from streamnn.nn.network import Network
from streamnn.nn.norm import BatchNorm
from streamnn.nn.pool import Flatten, GlobalAvgPool2D, MaxPool2D
from streamnn.nn.residual import Residual

LAYERS: dict[str, type[Layer]] = {cls.__name__: cls for cls in (
    Activation, BatchNorm, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D, MaxPool2D, Residual)}


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
           "MaxPool2D", "Network", "Residual", "Sequential", "layer_from_config"]
