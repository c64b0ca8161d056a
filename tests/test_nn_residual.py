"""Residual blocks: X + F(X), gradient checked, on the flat buffer, rebuilt from their config."""
from __future__ import annotations

import numpy as np
import pytest

from streamnn.errors import StreamnnError
from streamnn.nn import (Activation, BatchNorm, Conv2D, Dense, Flatten, Network, Residual, layer_from_config)
from streamnn.nn.gradcheck import gradient_check, layer_gradient_errors
from streamnn.nn.models import from_config


def test_residual_layer_gradients_parameters_and_input():
    block = Residual([Conv2D(3, 3, bias=False), BatchNorm(), Activation("tanh"), Conv2D(3, 3)])
    block.build((4, 5, 3), np.random.default_rng(0), np.float64)
    for p in block.params.values():
        p[...] = np.random.default_rng(1).normal(0, 0.5, p.shape)
    X = np.random.default_rng(2).normal(size=(2, 4, 5, 3))
    errors = layer_gradient_errors(block, X)
    assert set(errors) == {"conv0.W", "bn0.gamma", "bn0.beta", "conv1.W", "conv1.b", "input"}
    assert max(errors.values()) < 1e-6, errors


def _net(dtype=np.float32):
    layers = [Conv2D(4, 3), Activation("tanh"), Residual([Conv2D(4, 3), Activation("tanh"), Conv2D(4, 3)]),
              Flatten(), Dense(6, "he"),
              Residual([Dense(6), Activation("tanh")]), Dense(3)]
    return Network(layers, (5, 5, 2), "softmax", dtype=dtype, weight_decay=0.1, seed=3)


def test_network_with_residual_blocks_checks_and_lives_in_the_flat_buffer():
    model = _net()
    assert "res0.conv0.W" in model.params and "res1.dense0.W" in model.params
    assert all(np.shares_memory(p, model.flat_params) for p in model.params.values())
    inner = model.layers[2].inner.layers[0]
    assert np.shares_memory(inner.params["W"], model.flat_params)  # the inner layer reads the flat buffer
    assert np.shares_memory(inner.grads["W"], model.flat_grads)
    rng = np.random.default_rng(4)
    model.flat_params[...] = rng.normal(0, 0.4, model.flat_params.shape)
    X = rng.normal(size=(50, 4)).astype(np.float32)
    Y = np.eye(3)[rng.integers(0, 3, 4)].T
    assert gradient_check(model, X, Y) < 1e-6  # through a float64 copy rebuilt from config()


def test_residual_config_round_trip_and_shape_errors():
    model = _net()
    again = from_config(model.config())
    assert again.config() == model.config()
    again.load_state_dict(model.state_dict())
    X = np.random.default_rng(5).normal(size=(50, 3)).astype(np.float32)
    assert np.array_equal(again.predict_proba(X), model.predict_proba(X))
    assert isinstance(layer_from_config({"type": "Residual", "layers": [{"type": "Activation", "name": "relu"}]}),
                      Residual)
    with pytest.raises(StreamnnError, match="must keep the shape"):
        Network([Flatten(), Residual([Dense(3)]), Dense(2)], (2, 2, 1), "softmax")
    with pytest.raises(StreamnnError, match="at least one layer"):
        Residual([])
