"""Each layer against a direct loop-based reference, and gradient checks of every layer and a CNN."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamnn import StreamnnError
from streamnn.nn.gradcheck import gradient_check, gradient_errors, layer_gradient_errors
from streamnn.nn.models import ConvNet, from_config
from streamnn.nn import (Activation, BatchNorm, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D, MaxPool2D, Network,
                         layer_from_config)
from streamnn.rng import make_rng

TOL = 1e-6


def built(layer, shape, dtype=np.float64, seed=0):
    layer.build(shape, make_rng(seed), np.dtype(dtype))
    return layer


# -- slow references -------------------------------------------------------------------------
def conv_reference(X, W, b, stride, pad):
    """Direct loops: Y[n, y, x, f] = b[f] + sum_{i, j, c} Xp[n, s*y + i, s*x + j, c] W[i, j, c, f]."""
    B, H, Wd, C = X.shape
    k, F = W.shape[0], W.shape[3]
    Xp = np.zeros((B, H + 2 * pad, Wd + 2 * pad, C))
    Xp[:, pad:pad + H, pad:pad + Wd] = X
    Ho, Wo = (H + 2 * pad - k) // stride + 1, (Wd + 2 * pad - k) // stride + 1
    Y = np.zeros((B, Ho, Wo, F))
    for n in range(B):
        for y in range(Ho):
            for x in range(Wo):
                for f in range(F):
                    Y[n, y, x, f] = b[f] + np.sum(Xp[n, stride * y:stride * y + k, stride * x:stride * x + k] * W[..., f])
    return Y


def conv_backward_reference(X, W, dY, stride, pad):
    B, H, Wd, C = X.shape
    k = W.shape[0]
    Xp = np.zeros((B, H + 2 * pad, Wd + 2 * pad, C))
    Xp[:, pad:pad + H, pad:pad + Wd] = X
    dXp, dW = np.zeros_like(Xp), np.zeros_like(W)
    for n in range(B):
        for y in range(dY.shape[1]):
            for x in range(dY.shape[2]):
                for f in range(W.shape[3]):
                    g = dY[n, y, x, f]
                    patch = (n, slice(stride * y, stride * y + k), slice(stride * x, stride * x + k))
                    dW[..., f] += g * Xp[patch]
                    dXp[patch] += g * W[..., f]
    return dXp[:, pad:pad + H, pad:pad + Wd], dW, dY.sum(axis=(0, 1, 2))


def maxpool_reference(X):
    """Loops; the backward mask marks the first maximum of each window in row-major order."""
    B, H, W, C = X.shape
    Y = np.zeros((B, H // 2, W // 2, C))
    first = np.zeros_like(X)
    for n in range(B):
        for y in range(H // 2):
            for x in range(W // 2):
                for c in range(C):
                    window = X[n, 2 * y:2 * y + 2, 2 * x:2 * x + 2, c]
                    Y[n, y, x, c] = window.max()
                    a, b = np.unravel_index(np.argmax(window), (2, 2))  # argmax: the first maximum
                    first[n, 2 * y + a, 2 * x + b, c] = 1
    return Y, first


# -- Conv2D ----------------------------------------------------------------------------------
CONVS = [(3, 1, "same"), (3, 2, "same"), (3, 1, "valid"), (5, 1, "same"), (5, 2, "valid"), (3, 2, "valid")]


@pytest.mark.parametrize("k,stride,padding", CONVS)
def test_conv_matches_the_loop_reference(k, stride, padding):
    rng = np.random.default_rng(k * 10 + stride)
    layer = built(Conv2D(4, k, stride, padding), (7, 6, 3))
    layer.params["b"][:] = rng.normal(size=4)
    X = rng.normal(size=(2, 7, 6, 3))
    pad = k // 2 if padding == "same" else 0
    Y = layer.forward(X)
    np.testing.assert_allclose(Y, conv_reference(X, layer.params["W"], layer.params["b"], stride, pad), atol=1e-12)
    dY = rng.normal(size=Y.shape)
    dX = layer.backward(dY.copy())
    ref_dX, ref_dW, ref_db = conv_backward_reference(X, layer.params["W"], dY, stride, pad)
    np.testing.assert_allclose(dX, ref_dX, atol=1e-12)
    np.testing.assert_allclose(layer.grads["W"], ref_dW, atol=1e-12)
    np.testing.assert_allclose(layer.grads["b"], ref_db, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(h=st.integers(3, 8), w=st.integers(3, 8), c=st.integers(1, 3), f=st.integers(1, 3), b=st.integers(1, 3),
       k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), padding=st.sampled_from(["same", "valid"]))
def test_conv_equals_reference_for_any_shape(h, w, c, f, b, k, stride, padding):
    if padding == "valid" and (k > h or k > w):
        with pytest.raises(StreamnnError):
            built(Conv2D(f, k, stride, padding), (h, w, c))
        return
    layer = built(Conv2D(f, k, stride, padding), (h, w, c), seed=h * w)
    X = np.random.default_rng(b).normal(size=(b, h, w, c))
    pad = k // 2 if padding == "same" else 0
    np.testing.assert_allclose(layer.forward(X), conv_reference(X, layer.params["W"], layer.params["b"], stride, pad),
                               atol=1e-12)


def test_conv_shapes_init_and_buffer_reuse():
    layer = built(Conv2D(8, 3), (6, 6, 4), dtype=np.float32, seed=1)
    assert layer.params["W"].shape == (3, 3, 4, 8) and layer.params["W"].dtype == np.float32
    assert np.std(layer.params["W"]) == pytest.approx(np.sqrt(2 / 36), rel=0.3)  # He: var 2 / (k k C)
    X = np.random.default_rng(0).normal(size=(5, 6, 6, 4)).astype(np.float32)
    first = layer.forward(X)
    layer.backward(np.ones_like(first))
    again = layer.forward(X[:3])  # a smaller batch reuses the same buffers
    assert np.shares_memory(first, again) and again.shape == (3, 6, 6, 8)
    np.testing.assert_allclose(again, layer.forward(X)[:3])
    assert built(Conv2D(2, 3, 2, "same"), (7, 8, 1)).forward(np.zeros((1, 7, 8, 1))).shape == (1, 4, 4, 2)
    with pytest.raises(StreamnnError):
        built(Conv2D(2, 3), (6, 6))  # not images


# -- pooling, flatten ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 5, 7, 2)])
def test_maxpool_matches_the_loop_reference(shape):
    X = np.random.default_rng(0).normal(size=shape)
    layer = built(MaxPool2D(), shape[1:])
    Y = layer.forward(X)
    ref, first = maxpool_reference(X)
    np.testing.assert_array_equal(Y, ref)
    dY = np.random.default_rng(1).normal(size=Y.shape)
    dX = layer.backward(dY)
    expected = first * np.repeat(np.repeat(np.pad(dY, ((0, 0), (0, shape[1] % 2), (0, shape[2] % 2), (0, 0))),
                                           2, axis=1), 2, axis=2)[:, :shape[1], :shape[2]]
    np.testing.assert_array_equal(dX, expected)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2 ** 32 - 1))
def test_maxpool_routes_each_window_gradient_to_one_maximum_even_with_ties(seed):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 2, size=(2, 4, 4, 3)).astype(np.float64)  # many ties (as after a ReLU)
    layer = built(MaxPool2D(), (4, 4, 3))
    layer.forward(X)
    dX = layer.backward(np.ones((2, 2, 2, 3)))
    per_window = dX.reshape(2, 2, 2, 2, 2, 3).sum(axis=(2, 4))
    np.testing.assert_array_equal(per_window, 1)  # exactly one entry of every window got the gradient
    np.testing.assert_array_equal(dX, maxpool_reference(X)[1])


def test_flatten_is_the_store_row_order_and_global_average_pooling():
    X = np.arange(2 * 3 * 4 * 2, dtype=float).reshape(2, 3, 4, 2)
    flat = built(Flatten(), (3, 4, 2))
    F = flat.forward(X)
    np.testing.assert_array_equal(F, X.reshape(2, -1).T)  # column n is image n in HWC order
    np.testing.assert_array_equal(flat.backward(F.copy()), X)
    gap = built(GlobalAvgPool2D(), (3, 4, 2))
    G = gap.forward(X)
    np.testing.assert_allclose(G, [[X[n, :, :, c].mean() for n in range(2)] for c in range(2)])
    dX = gap.backward(np.ones((2, 2)))
    np.testing.assert_allclose(dX, np.full(X.shape, 1 / 12))


# -- batch norm ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,axes", [((5, 8), (1,)), ((4, 3, 3, 2), (0, 1, 2))])
def test_batchnorm_train_and_eval_modes(shape, axes):
    rng = np.random.default_rng(0)
    X = rng.normal(2.0, 3.0, size=shape)
    layer = built(BatchNorm(momentum=0.8), (shape[0],) if len(shape) == 2 else shape[1:])
    layer.params["gamma"][...] = 2.0
    layer.params["beta"][...] = 0.5
    Y = layer.forward(X, True)
    mu, var = X.mean(axis=axes, keepdims=True), X.var(axis=axes, keepdims=True)
    np.testing.assert_allclose(Y, 2.0 * (X - mu) / np.sqrt(var + 1e-5) + 0.5)
    n = X.size // mu.size
    np.testing.assert_allclose(layer.state["mean"].reshape(-1), 0.2 * mu.reshape(-1))
    np.testing.assert_allclose(layer.state["var"].reshape(-1), 0.8 + 0.2 * var.reshape(-1) * n / (n - 1))
    E = layer.forward(X, False)  # eval: the running statistics, not the batch's
    running = (layer.state["mean"].reshape(mu.shape), layer.state["var"].reshape(mu.shape))
    np.testing.assert_allclose(E, 2.0 * (X - running[0]) / np.sqrt(running[1] + 1e-5) + 0.5)
    saved = layer.state_dict()
    layer.forward(X * 3, True)
    layer.load_state_dict(saved)
    np.testing.assert_array_equal(layer.state["mean"], saved["mean"])


# -- gradient checks of every layer ----------------------------------------------------------
LAYERS = [
    (lambda: Dense(3), (4,), (4, 5)),
    (lambda: Conv2D(3, 3, 1, "same"), (5, 4, 2), (2, 5, 4, 2)),
    (lambda: Conv2D(2, 3, 2, "same"), (5, 6, 2), (2, 5, 6, 2)),
    (lambda: Conv2D(2, 5, 1, "same"), (5, 5, 1), (2, 5, 5, 1)),
    (lambda: Conv2D(2, 5, 2, "valid"), (7, 6, 2), (1, 7, 6, 2)),
    (lambda: Conv2D(2, 3, 1, "valid"), (4, 5, 2), (2, 4, 5, 2)),
    (lambda: MaxPool2D(), (4, 5, 2), (2, 4, 5, 2)),
    (lambda: Flatten(), (3, 2, 2), (2, 3, 2, 2)),
    (lambda: GlobalAvgPool2D(), (3, 2, 2), (2, 3, 2, 2)),
    (lambda: BatchNorm(), (4,), (4, 6)),
    (lambda: BatchNorm(), (3, 3, 2), (3, 3, 3, 2)),
    (lambda: Dropout(0.4), (6,), (6, 5)),
    *[(lambda a=a: Activation(a), (5,), (5, 4)) for a in ("relu", "leaky_relu", "tanh", "sigmoid")],
]


@pytest.mark.parametrize("make,shape,x_shape", LAYERS)
def test_gradient_check_of_every_layer(make, shape, x_shape):
    layer = built(make(), shape, seed=3)
    rng = np.random.default_rng(4)
    for p in layer.params.values():
        p[...] = rng.normal(0, 0.8, p.shape)
    errors = layer_gradient_errors(layer, rng.normal(size=x_shape))
    assert set(errors) == {*layer.params, "input"}
    assert max(errors.values()) < TOL, errors


def tiny_cnn(**kw):
    layers = [Conv2D(3, 3), BatchNorm(), Activation("relu"), MaxPool2D(), Conv2D(4, 5, 2, "same"),
              Activation("tanh"), Flatten(), Dense(5), Activation("leaky_relu"), Dropout(0.3), Dense(3, "xavier")]
    return Network(layers, (6, 6, 2), "softmax", dtype=np.float64, weight_decay=0.1, seed=1, **kw)


def test_gradient_check_of_a_whole_cnn():
    model = tiny_cnn()
    rng = np.random.default_rng(0)
    for name, p in model.params.items():
        if name.endswith(".b") or name.endswith(".beta"):
            p[...] = rng.normal(0, 0.3, p.shape)
    X = rng.normal(size=(72, 4))
    Y = np.eye(3)[[0, 2, 1, 2]].T
    errors = gradient_errors(model, X, Y)
    # a bias before batch norm is cancelled by it: its true gradient is 0 (no relative error exists)
    assert np.abs(model.grads["conv0.b"]).max() < 1e-12
    assert max(e for name, e in errors.items() if name != "conv0.b") < TOL, errors
    binary = ConvNet((8, 8, 1), [2, 3], [4], 2, dropout=0.2, dtype=np.float64, weight_decay=0.05)
    assert gradient_check(binary, rng.normal(size=(64, 5)), np.array([[0, 1, 1, 0, 1.0]])) < TOL


def test_gradient_check_of_a_float32_cnn_goes_through_a_float64_copy():
    model = ConvNet((6, 6, 1), [2], [3], 2, seed=2)
    before = model.state_dict()
    X = np.random.default_rng(1).normal(size=(36, 3))
    assert gradient_check(model, X, np.array([[0, 1, 1.0]])) < TOL
    assert all(np.array_equal(v, model.state_dict()[k]) for k, v in before.items() if k != "rng")


# -- the CNN as a model ----------------------------------------------------------------------
def test_conv_net_reads_feature_columns_as_images_and_round_trips_its_config():
    model = ConvNet((8, 8, 3), [4, 6], [5], 3, batch_norm=True, dropout=0.2, seed=4)
    assert [type(l).__name__ for l in model.layers] == [
        "Conv2D", "BatchNorm", "MaxPool2D", "Activation", "Conv2D", "BatchNorm", "MaxPool2D", "Activation",
        "Flatten", "Dense", "Activation", "Dropout", "Dense"]
    assert "conv0.W" in model.params and "bn1.gamma" in model.params and "bn0.mean" in model.state_dict()
    assert all(np.shares_memory(p, model.flat_params) for p in model.params.values())
    X = np.random.default_rng(0).random((192, 70)).astype(np.float32)
    P = model.predict_proba(X)  # eval mode runs in chunks of 64 images
    assert P.shape == (3, 70)
    np.testing.assert_allclose(P[:, :5], model.predict_proba(X[:, :5]), rtol=1e-5)
    manual = model.body.forward(X.T.reshape(70, 8, 8, 3)[:5], False)  # the same images, as NHWC
    np.testing.assert_allclose(model.predict_proba(X[:, :5]), np.exp(manual) / np.exp(manual).sum(0), rtol=1e-5)
    again = from_config(model.config())
    assert np.array_equal(again.flat_params, model.flat_params)
    generic = Network([layer_from_config(layer.config()) for layer in model.layers], (8, 8, 3), "softmax", seed=4)
    assert np.array_equal(from_config(generic.config()).flat_params, generic.flat_params)
    assert generic.flat_params.size == model.flat_params.size
    with pytest.raises(RuntimeError):
        model.backward(np.eye(3)[[0] * 70].T)  # the eval forward ended the train cache
    with pytest.raises(StreamnnError):
        ConvNet((4, 4, 3), [2, 2, 2], [], 2)  # three halvings of 4x4 images
