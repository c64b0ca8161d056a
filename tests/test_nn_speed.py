"""The CNN's speed-ups keep its numbers: pooling before ReLU equals ReLU before pooling, bit for bit."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from streamnn.nn import Activation, MaxPool2D


def _built(layer, shape, dtype):
    layer.build(shape, np.random.default_rng(0), dtype)
    return layer


@settings(max_examples=60, deadline=None)
@given(h=st.integers(2, 7), w=st.integers(2, 7), c=st.integers(1, 3), b=st.integers(1, 3), seed=st.integers(0, 99),
       ties=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_pool_then_relu_is_relu_then_pool_bit_for_bit(h, w, c, b, seed, ties, dtype):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((b, h, w, c)).astype(dtype)
    if ties:  # equal maxima and all-negative windows, as ReLU's zeros and rounding make them
        X = np.round(X).astype(dtype)
    dY = rng.standard_normal((b, h // 2, w // 2, c)).astype(dtype)
    relu_a, pool_a = _built(Activation("relu"), (h, w, c), dtype), _built(MaxPool2D(2), (h, w, c), dtype)
    pool_b, relu_b = _built(MaxPool2D(2), (h, w, c), dtype), _built(Activation("relu"), (h // 2, w // 2, c), dtype)
    Ya = pool_a.forward(relu_a.forward(X.copy()))
    Yb = relu_b.forward(pool_b.forward(X.copy()))
    assert np.array_equal(Ya, Yb)
    dXa = relu_a.backward(pool_a.backward(dY.copy()).copy())
    dXb = pool_b.backward(relu_b.backward(dY.copy()))
    assert np.array_equal(dXa, dXb)
    assert np.array_equal(dXa == 0, dXb == 0)
