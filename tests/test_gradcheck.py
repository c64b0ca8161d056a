"""Gradient checks: every activation, both losses, L2, dropout, logistic and deep networks."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from streamnn.nn.functional import ACTIVATIONS
from streamnn.nn.gradcheck import gradient_check, gradient_errors, relative_error
from streamnn.nn.models import DeepNetwork, LogisticRegression
from streamnn.nn import Dropout

TOL = 1e-6


def randomized(model, seed: int = 0):
    """Random biases too, so that no pre-activation sits exactly on a ReLU kink."""
    rng = np.random.default_rng(seed)
    for p in model.params.values():
        p[...] = rng.normal(0, 0.8, p.shape)
    return model


def data(n_features: int, n_classes: int, m: int = 6, seed: int = 1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_features, m))
    k = rng.integers(0, max(n_classes, 2), m)
    Y = k[None, :].astype(float) if n_classes == 1 else np.eye(n_classes)[k].T
    return X, Y


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("output,n_out", [("sigmoid", 1), ("softmax", 4)])
def test_every_activation_with_both_losses(act, output, n_out):
    model = randomized(DeepNetwork([5, 4, 3, n_out], [act, act, output], dtype=np.float64))
    X, Y = data(5, n_out)
    assert gradient_check(model, X, Y) < TOL


@pytest.mark.parametrize("output,n_out", [("sigmoid", 1), ("softmax", 3)])
def test_weight_decay(output, n_out):
    model = randomized(DeepNetwork([5, 4, n_out], ["tanh", output], dtype=np.float64,
                                   weight_decay=0.9))
    assert gradient_check(model, *data(5, n_out)) < TOL


@pytest.mark.parametrize("act", ["relu", "sigmoid"])
def test_dropout_with_a_fixed_mask(act):
    model = randomized(DeepNetwork([5, 6, 6, 3], [act, act, "softmax"], dtype=np.float64,
                                   dropout=0.4, weight_decay=0.1, seed=2))
    X, Y = data(5, 3)
    assert gradient_check(model, X, Y) < TOL
    model.forward(X)
    masks = [layer.mask for layer in model.layers if isinstance(layer, Dropout)]
    assert any((mask == 0).any() for mask in masks)  # dropout was active


def test_logistic_regression():
    model = LogisticRegression(6, dtype=np.float64, weight_decay=0.3)
    X, Y = data(6, 1, m=7)  # unbalanced labels: at the zero start db = mean(1/2 - y) != 0
    assert gradient_check(model, X, Y) < TOL
    assert gradient_check(randomized(model), X, Y) < TOL


def test_deep_network_of_the_tutorial_shape():
    model = randomized(DeepNetwork([12, 8, 4, 1], ["relu", "relu", "sigmoid"],
                                   dtype=np.float64))
    assert gradient_check(model, *data(12, 1, m=10)) < TOL


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       acts=st.lists(st.sampled_from(["tanh", "sigmoid"]), min_size=3, max_size=3),
       n_out=st.integers(1, 4), seed=st.integers(0, 1000))
def test_smooth_networks_of_any_shape(sizes, acts, n_out, seed):
    output = "sigmoid" if n_out == 1 else "softmax"
    model = randomized(DeepNetwork([3, *sizes, n_out], acts[:len(sizes)] + [output],
                                   dtype=np.float64, weight_decay=0.05), seed)
    X, Y = data(3, n_out, m=4, seed=seed)
    model.loss(Y, model.forward(X))
    model.backward(Y)
    # A relative error means nothing for a gradient near the centered difference's own noise
    # (|error| ~ 1e-11 here): 1-unit layers behind saturated units reach norms of 1e-10, and gave
    # relative errors up to 0.025 for correct gradients. Above 1e-5 (99% of 1,500 random cases,
    # 1-unit layers included) the worst was 1.9e-7.
    assume(min(np.linalg.norm(g) for g in model.grads.values()) > 1e-5)
    assert gradient_check(model, X, Y) < TOL


def test_float32_models_are_checked_through_a_float64_copy():
    model = randomized(DeepNetwork([5, 4, 3], ["tanh", "softmax"], dropout=0.3))
    before = model.state_dict()
    X, Y = data(5, 3)
    assert gradient_check(model, X, Y) < TOL
    after = model.state_dict()
    assert after["rng"] == before["rng"]
    for name in model.params:
        np.testing.assert_array_equal(after[name], before[name])


def test_float64_model_is_left_as_it_was():
    model = randomized(DeepNetwork([5, 4, 1], ["relu", "sigmoid"], dtype=np.float64,
                                   dropout=0.2))
    before = model.state_dict()
    gradient_check(model, *data(5, 1))
    after = model.state_dict()
    assert after["rng"] == before["rng"]
    for name in model.params:
        np.testing.assert_array_equal(after[name], before[name])


def test_a_wrong_gradient_is_caught():
    model = randomized(DeepNetwork([4, 3, 1], ["tanh", "sigmoid"], dtype=np.float64))
    X, Y = data(4, 1)
    backward = model.backward

    def off_by_a_factor(Y):
        backward(Y)
        model.grads["W0"] *= 1.01

    model.backward = off_by_a_factor
    errors = gradient_errors(model, X, Y)
    assert errors["W0"] > 1e-3 and max(v for k, v in errors.items() if k != "W0") < TOL
    assert gradient_check(model, X, Y) == errors["W0"]


def test_subsampled_entries():
    model = randomized(DeepNetwork([30, 20, 1], ["tanh", "sigmoid"], dtype=np.float64))
    assert gradient_check(model, *data(30, 1), max_entries=10) < TOL


def test_relative_error():
    assert relative_error(np.zeros(3), np.zeros(3)) == 0
    assert relative_error(np.array([1.0, 0]), np.array([1.0, 0])) == 0
    assert relative_error(np.array([3.0, 0]), np.array([0, 4.0])) == pytest.approx(5 / 7)


def test_batch_normed_cnn_without_conv_bias_checks_clean_and_the_old_bias_was_the_only_outlier():
    """Before a batch norm the conv bias has an exactly zero gradient (gradient_check then reports ~1
    for it); training builds such CNNs without it, and every parameter then checks."""
    from streamnn.nn.models import ConvNet

    rng = np.random.default_rng(3)
    X = rng.normal(size=(6 * 6 * 2, 5))
    Y = (rng.random((1, 5)) < 0.5).astype(float)
    clean = ConvNet((6, 6, 2), [3], [4], 2, batch_norm=True, conv_bias=False, dtype=np.float64, seed=1)
    assert "conv0.b" not in clean.params and clean.config()["conv_bias"] is False
    assert gradient_check(clean, X, Y) < 1e-5
    old = ConvNet((6, 6, 2), [3], [4], 2, batch_norm=True, dtype=np.float64, seed=1)
    assert "conv_bias" not in old.config()  # configs (and checkpoints) of biased models as before
    errors = gradient_errors(old, X, Y)
    assert np.abs(old.grads["conv0.b"]).max() < 1e-12
    assert max(v for k, v in errors.items() if k != "conv0.b") < 1e-5


@pytest.mark.parametrize("output,n_out", [("sigmoid", 1), ("softmax", 4)])
def test_label_smoothing_gradient_and_its_minimum(output, n_out):
    model = randomized(DeepNetwork([5, 4, n_out], ["tanh", output], dtype=np.float64))
    model.label_smoothing = 0.2
    X, Y = data(5, n_out)
    assert gradient_check(model, X, Y) < TOL
    # the smoothed cost is smallest where the outputs are the smoothed targets: its gradient vanishes there
    K = max(n_out, 2)
    T = Y * 0.8 + 0.2 / K
    assert np.allclose(model._loss.gradient(T, model._targets(Y)), 0)
    plain = randomized(DeepNetwork([5, 4, n_out], ["tanh", output], dtype=np.float64))
    A = plain.forward(X)
    model.forward(X)
    assert model.loss(Y, model.forward(X)) > plain.loss(Y, A) - 1  # a finite, comparable cost
    assert model.evaluate(X, Y)["accuracy"] == plain.evaluate(X, Y)["accuracy"]  # accuracy on the labels


@pytest.mark.parametrize("batch_norm", [False, True])
def test_cnn_with_a_global_average_pooling_head(batch_norm):
    """head="gap": each channel's mean feeds the dense layers; every parameter checks, conv ones included."""
    from streamnn.nn.models import ConvNet

    rng = np.random.default_rng(4)
    X = rng.normal(size=(8 * 6 * 2, 5))
    Y = np.eye(3)[rng.integers(0, 3, 5)].T
    model = ConvNet((8, 6, 2), [3, 4], [5], 3, batch_norm=batch_norm, conv_bias=not batch_norm, head="gap",
                    dtype=np.float64, seed=2)
    assert model.params["dense0.W"].shape == (5, 4)  # conv[-1] features, not 2 * 1 * 4
    assert gradient_check(model, X, Y) < 1e-5
