"""Layers rebuild the flat models exactly; parameters and gradients live in one flat buffer."""
from __future__ import annotations

import numpy as np
import pytest

from streamnn.nn.functional import ACTIVATIONS
from streamnn.nn.losses import LOSSES
from streamnn.nn.models import DeepNetwork, LogisticRegression, from_config
from streamnn.optim import OPTIMIZERS, make_optimizer

LR = {"sgd": 0.1, "momentum": 0.1, "rmsprop": 0.01, "adam": 0.01}


class Reference:
    """The pre-layer DeepNetwork, written from its formulas: W[l] ~ N(0, var) drawn in layer
    order from PCG64(seed), Z = W A + b, A = g(Z) * mask (masks drawn from the same generator
    during the forward pass), dZ = (A - Y) / m at the output, dW = dZ A^T + lambd/m W."""

    def __init__(self, sizes, acts, dtype, weight_decay, dropout, seed, zeros=False):
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.acts, self.dtype, self.wd, self.p = acts, np.dtype(dtype), weight_decay, dropout
        self.W, self.b = [], []
        for l, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            he = l < len(acts) - 1 and ACTIVATIONS[acts[l]].init == "he"
            var = 2 / n_in if he else 2 / (n_in + n_out)
            W = np.zeros((n_out, n_in)) if zeros else self.rng.standard_normal((n_out, n_in)) * np.sqrt(var)
            self.W.append(W.astype(self.dtype))
            self.b.append(np.zeros((n_out, 1), self.dtype))
        self.loss_fn = LOSSES[acts[-1]]

    def forward(self, X):
        A = X.astype(self.dtype)
        self.cache = []
        for l in range(len(self.W) - 1):
            Z = self.W[l] @ A + self.b[l]
            G = ACTIVATIONS[self.acts[l]].forward(Z)
            mask = None
            if self.p:
                mask = (self.rng.random(G.shape) >= self.p).astype(self.dtype)
                mask /= 1 - self.p
            self.cache.append((A, Z, G, mask))
            A = G * mask if mask is not None else G
        self.last_input = A
        self.Z = self.W[-1] @ A + self.b[-1]
        self.out = self.loss_fn.output(self.Z)
        return self.out

    def backward(self, Y):
        m = Y.shape[1]
        dZ = self.loss_fn.gradient(self.out, Y.astype(self.dtype))
        inputs = [c[0] for c in self.cache] + [self.last_input]
        dW, db = [None] * len(self.W), [None] * len(self.W)
        for l in reversed(range(len(self.W))):
            dW[l] = dZ @ inputs[l].T + (self.W[l] * (self.wd / m) if self.wd else 0)
            db[l] = dZ.sum(axis=1, keepdims=True)
            if l > 0:
                _, Zp, Gp, mask = self.cache[l - 1]
                dA = self.W[l].T @ dZ
                if mask is not None:
                    dA *= mask
                dZ = ACTIVATIONS[self.acts[l - 1]].backward(dA, Zp, Gp)
        return dW, db


CASES = [([6, 5, 4, 1], ["relu", "tanh", "sigmoid"], 0.1, 0.3),
         ([6, 7, 3], ["leaky_relu", "softmax"], 0.0, 0.0),
         ([6, 4, 4, 3], ["sigmoid", "relu", "softmax"], 0.5, 0.2)]


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("sizes,acts,wd,p", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deep_network_gives_the_pre_layer_numbers_exactly(seed, sizes, acts, wd, p, dtype):
    ours = DeepNetwork(sizes, acts, dtype=dtype, weight_decay=wd, dropout=p, seed=seed)
    ref = Reference(sizes, acts, dtype, wd, p, seed)
    for l in range(len(ref.W)):
        assert np.array_equal(ours.params[f"W{l}"], ref.W[l]) and np.array_equal(ours.params[f"b{l}"], ref.b[l])
    rng = np.random.default_rng(seed)
    for step in range(3):
        X = rng.normal(size=(sizes[0], 9))
        k = rng.integers(0, max(sizes[-1], 2), 9)
        Y = k[None].astype(float) if sizes[-1] == 1 else np.eye(sizes[-1])[k].T
        P = ours.forward(X)
        assert np.array_equal(P, ref.forward(X))
        ours.backward(Y)
        dW, db = ref.backward(Y)
        for l in range(len(ref.W)):
            assert np.array_equal(ours.grads[f"W{l}"], dW[l]), (step, l)
            assert np.array_equal(ours.grads[f"b{l}"], db[l]), (step, l)
        for l in range(len(ref.W)):  # the same plain update on both
            ours.params[f"W{l}"] -= 0.1 * ours.grads[f"W{l}"]
            ref.W[l] -= 0.1 * dW[l]
            ours.params[f"b{l}"] -= 0.1 * ours.grads[f"b{l}"]
            ref.b[l] -= 0.1 * db[l]


def test_logistic_regression_starts_at_zero_like_before():
    ours = LogisticRegression(5, dtype=np.float64, weight_decay=0.2, seed=3)
    ref = Reference([5, 1], ["sigmoid"], np.float64, 0.2, 0.0, 3, zeros=True)
    X, Y = np.random.default_rng(0).normal(size=(5, 8)), np.array([[0, 1, 1, 0, 1, 0, 0, 1.0]])
    assert np.array_equal(ours.forward(X), ref.forward(X))
    ours.backward(Y)
    dW, db = ref.backward(Y)
    assert np.array_equal(ours.grads["W0"], dW[0]) and np.array_equal(ours.grads["b0"], db[0])


@pytest.mark.parametrize("model", [DeepNetwork([6, 5, 4, 3], ["relu", "tanh", "softmax"], dropout=0.2),
                                   LogisticRegression(4, dtype=np.float64)])
def test_every_parameter_and_gradient_is_a_view_into_one_flat_buffer(model):
    assert model.flat_params.ndim == 1 and model.flat_params.flags.c_contiguous
    assert model.flat_params.size == model.flat_grads.size == sum(p.size for p in model.params.values())
    offset = 0
    for name, p in model.params.items():
        assert np.shares_memory(p, model.flat_params) and np.shares_memory(model.grads[name], model.flat_grads)
        assert p.size == model.params[name].size
        np.testing.assert_array_equal(model.flat_params[offset:offset + p.size], p.reshape(-1))
        offset += p.size
    model.flat_params[:] = np.arange(model.flat_params.size)  # writes through to every layer
    X = np.ones((model.n_features, 2))
    model.forward(X)
    model.backward(np.zeros((model.n_classes, 2)) if model.n_classes > 1 else np.zeros((1, 2)))
    assert model.layers[0].needs_input_grad is False  # no gradient for the input is computed
    offset = 0
    for name, g in model.grads.items():
        np.testing.assert_array_equal(model.flat_grads[offset:offset + g.size], g.reshape(-1))
        offset += g.size
    state = model.state_dict()  # load_state_dict copies into the views, never replaces them
    before = {name: p for name, p in model.params.items()}
    model.load_state_dict(state)
    assert all(model.params[name] is before[name] for name in before)
    assert all(np.shares_memory(p, model.flat_params) for p in model.params.values())


class PerParameter:
    """The same model seen only through its params / grads dicts (no flat buffer)."""

    def __init__(self, model):
        self.params, self.grads = model.params, model.grads


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_on_the_flat_buffer_match_per_parameter_updates(name):
    def run(view):
        model = DeepNetwork([8, 6, 3], ["relu", "softmax"], weight_decay=0.1, dropout=0.1, seed=2)
        opt = make_optimizer(name, view(model), LR[name], weight_decay=0.01)
        rng = np.random.default_rng(0)
        for _ in range(5):
            X, k = rng.normal(size=(8, 16)), rng.integers(0, 3, 16)
            model.forward(X)
            model.backward(np.eye(3)[k].T)
            opt.step()
        return model, opt

    flat, flat_opt = run(lambda m: m)
    split, split_opt = run(PerParameter)
    assert np.array_equal(flat.flat_params, split.flat_params)
    for key, value in flat_opt.state_dict().items():
        assert np.array_equal(value, split_opt.state_dict()[key]), key
    assert all(np.shares_memory(v, flat_opt._flat_buffers[0][0]) or np.shares_memory(v, flat_opt._flat_buffers[0][-1])
               for v in flat_opt.state.values())


def test_config_round_trip_rebuilds_the_same_model():
    model = DeepNetwork([6, 5, 3], ["tanh", "softmax"], dropout=0.3, seed=5)
    again = from_config(model.config())
    assert np.array_equal(again.flat_params, model.flat_params)
