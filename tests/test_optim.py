"""Optimizers: hand-computed steps, state, live parameters, learning, bit-exact resume."""
from __future__ import annotations

import importlib.util
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamnn import StreamnnError
from streamnn.nn.models import DeepNetwork, LogisticRegression, from_config
from streamnn.optim import OPTIMIZERS, Adam, GradientDescent, Momentum, RMSProp, make_optimizer
from streamnn.optim.schedules import make_schedule


class Stub:
    """The least a model needs for an optimizer: params and grads by name."""

    def __init__(self, p, g, dtype=np.float64):
        self.params = {"w": np.array(p, dtype)}
        self.grads = {"w": np.array(g, dtype)}


def one_step(opt_cls, p, g, **kw):
    model = Stub(p, g)
    opt = opt_cls(model, **kw)
    opt.step()
    return model, opt


# -- one step equals the formula, by hand ----------------------------------------------------
def test_gradient_descent_step():
    model, _ = one_step(GradientDescent, [1.0, -2.0], [0.5, -0.25], lr=0.1)
    np.testing.assert_allclose(model.params["w"], [1.0 - 0.05, -2.0 + 0.025])


def test_momentum_is_a_moving_average_of_gradients():
    model, opt = one_step(Momentum, [1.0], [0.5], lr=0.1, beta=0.9)
    assert model.params["w"][0] == pytest.approx(1 - 0.1 * 0.05)  # v = 0.1 * 0.5
    model.grads["w"][:] = -1.0
    opt.step()  # v = 0.9 * 0.05 + 0.1 * -1 = -0.055
    assert model.params["w"][0] == pytest.approx(0.995 + 0.0055)


@pytest.mark.parametrize("bias_correction,expected", [
    (True, 1 - 0.1 * 0.5 / (0.5 + 1e-8)),  # s_hat = 0.00025 / 0.001 = 0.25
    (False, 1 - 0.1 * 0.5 / (np.sqrt(0.00025) + 1e-8)),  # s = 0.001 * 0.5^2
])
def test_rmsprop_step(bias_correction, expected):
    model, _ = one_step(RMSProp, [1.0], [0.5], lr=0.1, bias_correction=bias_correction)
    assert model.params["w"][0] == pytest.approx(expected, rel=1e-12)


def test_adam_two_steps_with_bias_correction():
    model, opt = one_step(Adam, [1.0], [0.5], lr=0.1)
    # m = 0.05, v = 0.00025, m_hat = 0.5, v_hat = 0.25
    assert model.params["w"][0] == pytest.approx(1 - 0.1 * 0.5 / (0.5 + 1e-8), rel=1e-12)
    model.grads["w"][:] = -1.0
    opt.step()
    m = 0.9 * 0.05 + 0.1 * -1.0
    v = 0.999 * 0.00025 + 0.001 * 1.0
    m_hat, v_hat = m / (1 - 0.9**2), v / (1 - 0.999**2)
    expected = 1 - 0.1 * 0.5 / (0.5 + 1e-8) - 0.1 * m_hat / (np.sqrt(v_hat) + 1e-8)
    assert model.params["w"][0] == pytest.approx(expected, rel=1e-12)
    assert opt.t == 2


def test_adam_without_bias_correction():
    model, opt = one_step(Adam, [1.0], [0.5], lr=0.1, bias_correction=False)
    expected = 1 - 0.1 * 0.05 / (np.sqrt(0.00025) + 1e-8)
    assert model.params["w"][0] == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(opt.state["m.w"], [0.05])
    np.testing.assert_allclose(opt.state["v.w"], [0.00025])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_decoupled_weight_decay(name):
    plain, _ = one_step(OPTIMIZERS[name], [2.0, -3.0], [1.0, 0.5], lr=0.1)
    decayed, _ = one_step(OPTIMIZERS[name], [2.0, -3.0], [1.0, 0.5], lr=0.1, weight_decay=0.5)
    # p - lr wd p - lr update: the decay shrinks p by lr * wd * p, whatever the update
    np.testing.assert_allclose(decayed.params["w"] - plain.params["w"],
                               [-0.1 * 0.5 * 2.0, 0.1 * 0.5 * 3.0], rtol=1e-12)


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=5),
       st.lists(st.floats(1e-3, 1e3) | st.floats(-1e3, -1e-3), min_size=5, max_size=5))
def test_first_adam_step_moves_every_parameter_by_about_lr(p, g):
    g = np.array(g[:len(p)])
    model, _ = one_step(Adam, p, g, lr=0.01)  # bias-corrected: m_hat = g, v_hat = g^2
    np.testing.assert_allclose(model.params["w"], p - 0.01 * g / (np.abs(g) + 1e-8),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@given(p=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=4))
def test_zero_gradients_leave_parameters_alone(name, p):
    model, _ = one_step(OPTIMIZERS[name], p, [0.0] * len(p), lr=0.1)
    np.testing.assert_array_equal(model.params["w"], p)


# -- live parameters, lr, dtype, allocation --------------------------------------------------
def test_steps_follow_the_model_parameters_by_name():
    model = Stub([1.0, 1.0], [1.0, 1.0])
    opt = GradientDescent(model, lr=0.5)
    model.params["w"] = np.array([5.0, 5.0])  # a new array under the same name
    opt.step()
    np.testing.assert_array_equal(model.params["w"], [4.5, 4.5])


def test_optimizer_survives_the_model_loading_a_state():
    model = DeepNetwork([3, 2, 1], ["tanh", "sigmoid"], dtype=np.float64)
    saved = model.state_dict()
    opt = GradientDescent(model, lr=1.0)
    X, Y = np.ones((3, 4)), np.ones((1, 4))
    model.forward(X)
    model.backward(Y)
    opt.step()
    model.load_state_dict(saved)
    model.forward(X)
    model.backward(Y)
    opt.step()
    np.testing.assert_allclose(model.params["W0"], saved["W0"] - model.grads["W0"])


def test_lr_is_read_at_each_step_and_never_upcasts():
    model = Stub([1.0], [1.0], dtype=np.float32)
    opt = Adam(model, lr=0.1)
    opt.lr = np.float64(0.5)  # e.g. set by a schedule
    opt.step()
    assert model.params["w"].dtype == np.float32 and opt.state["m.w"].dtype == np.float32
    assert model.params["w"][0] == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_steps_allocate_no_parameter_sized_memory(name):
    model = DeepNetwork([500, 200, 1], ["relu", "sigmoid"], weight_decay=0.1)
    opt = make_optimizer(name, model, lr=0.01, weight_decay=0.01)
    X, Y = np.ones((500, 8), np.float32), np.ones((1, 8), np.float32)
    model.forward(X)
    model.backward(Y)
    opt.step()
    grads = dict(model.grads)
    tracemalloc.start()
    try:
        model.backward(Y)
        opt.step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < model.params["W0"].nbytes / 4
    assert all(model.grads[k] is grads[k] for k in grads)


# -- state -------------------------------------------------------------------------------------
def test_state_dict_layout_and_zero_buffers():
    model = DeepNetwork([3, 2, 1], ["relu", "sigmoid"])
    state = Adam(model, lr=0.1).state_dict()
    assert set(state) == {"t", "lr", *(f"{b}.{n}" for b in "mv" for n in model.params)}
    assert state["t"] == 0 and state["lr"] == 0.1
    for name, p in model.params.items():
        assert state[f"m.{name}"].shape == p.shape and state[f"v.{name}"].dtype == p.dtype
        assert not state[f"m.{name}"].any() and not state[f"v.{name}"].any()
    assert set(Momentum(model, 0.1).state_dict()) == {"t", "lr", *(f"v.{n}" for n in model.params)}
    assert set(GradientDescent(model, 0.1).state_dict()) == {"t", "lr"}


@pytest.mark.parametrize("corrupt", [
    lambda s: s.pop("v.b0"),
    lambda s: s.update({"s.W0": np.zeros((2, 3), np.float32)}),
    lambda s: s.update({"m.W0": np.zeros((3, 2), np.float32)}),
    lambda s: s.update({"m.W0": np.zeros((2, 3), np.float64)}),
    lambda s: s.update({"m.W0": 0.0}),
    lambda s: s.update(t=-1),
    lambda s: s.update(t=1.5),
    lambda s: s.update(lr="fast"),
])
def test_load_state_dict_checks_before_changing_anything(corrupt):
    model = DeepNetwork([3, 2, 1], ["relu", "sigmoid"])
    source = Adam(model, lr=0.1)
    model.forward(np.ones((3, 4)))
    model.backward(np.ones((1, 4)))
    source.step()
    state = source.state_dict()
    corrupt(state)
    target = Adam(model, lr=0.3)
    with pytest.raises(StreamnnError) as info:
        target.load_state_dict(state)
    assert "\n" not in str(info.value)
    assert target.t == 0 and target.lr == 0.3
    assert not any(buf.any() for buf in target.state.values())


def test_make_optimizer_and_config_round_trip():
    model = DeepNetwork([3, 2, 1], ["relu", "sigmoid"])
    for name in ("sgd", "momentum", "rmsprop", "adam"):
        opt = make_optimizer(name, model, 0.01, weight_decay=0.1)
        assert isinstance(opt, OPTIMIZERS[name]) and opt.lr == 0.01
        assert make_optimizer(model=model, **opt.config()).config() == opt.config()
    assert make_optimizer("adam", model, 0.01, beta2=0.9, bias_correction=False).config() == {
        "name": "adam", "lr": 0.01, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.9,
        "eps": 1e-8, "bias_correction": False}


@pytest.mark.parametrize("name,kw", [("adamw", {}), ("sgd", {"beta": 0.9}), ("adam", {"lr": -1}),
                                     ("momentum", {"beta": 1.0}), ("rmsprop", {"eps": 0}),
                                     ("adam", {"weight_decay": float("nan")})])
def test_bad_optimizer_arguments(name, kw):
    model = DeepNetwork([3, 2, 1], ["relu", "sigmoid"])
    with pytest.raises(StreamnnError):
        make_optimizer(name, model, **{"lr": 0.1, **kw})


# -- learning ----------------------------------------------------------------------------------
LR = {"sgd": 0.5, "momentum": 0.5, "rmsprop": 0.01, "adam": 0.01}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_logistic_regression_separates_two_gaussian_blobs(name):
    rng = np.random.default_rng(0)
    Y = (rng.random((1, 200)) < 0.5).astype(np.float32)
    X = rng.normal(size=(2, 200)) + 3 * (2 * Y - 1)  # centres (-3, -3) and (3, 3)
    model = LogisticRegression(2)
    opt = make_optimizer(name, model, LR[name])
    for _ in range(100):
        model.forward(X)
        model.backward(Y)
        opt.step()
    assert model.evaluate(X, Y)["accuracy"] >= 0.99


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_deep_network_learns_xor(name):
    rng = np.random.default_rng(1)
    X = rng.uniform(-1, 1, (2, 256))
    Y = (X[0] * X[1] > 0)[None].astype(np.float32)
    model = DeepNetwork([2, 16, 1], ["tanh", "sigmoid"], seed=1)
    opt = make_optimizer(name, model, LR[name])
    for epoch in range(300):
        for batch in np.split(np.arange(256), 4):
            model.forward(X[:, batch])
            model.backward(Y[:, batch])
            opt.step()
    assert model.evaluate(X, Y)["accuracy"] >= 0.97


def test_softmax_network_learns_three_classes():
    rng = np.random.default_rng(2)
    k = rng.integers(0, 3, 300)
    centres = np.array([[0, 4], [4, 0], [-4, -4]]).T
    X, Y = centres[:, k] + rng.normal(size=(2, 300)), np.eye(3)[k].T
    model = DeepNetwork([2, 8, 3], ["relu", "softmax"])
    opt = Adam(model, lr=0.05)
    for _ in range(150):
        model.forward(X)
        model.backward(Y)
        opt.step()
    assert model.evaluate(X, Y)["accuracy"] >= 0.99


def test_matches_the_tutorial_deep_network_and_adam():
    spec = importlib.util.spec_from_file_location(
        "tutorial_reference", Path(__file__).parent.parent / "tools" / "tutorial_reference.py")
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)
    rng = np.random.default_rng(5)
    X, Y = rng.normal(size=(6, 10)), (rng.random((1, 10)) < 0.5).astype(float)
    ours = DeepNetwork([6, 5, 4, 1], ["relu", "relu", "sigmoid"], dtype=np.float64, seed=5)
    theirs = tutorial.DeepNetwork([6, 5, 4, 1], ["relu", "relu", "sigmoid"])
    for l in range(3):
        theirs.W[l][...] = ours.params[f"W{l}"]
        theirs.b[l][...] = rng.normal(size=theirs.b[l].shape)
        ours.params[f"b{l}"][...] = theirs.b[l]
    opt, their_opt = Adam(ours, lr=0.01), tutorial.Adam(theirs.save(), 0.01)
    for _ in range(3):
        np.testing.assert_allclose(ours.forward(X), theirs.forward(X), rtol=1e-12)
        ours.backward(Y)
        opt.step()
        tutorial.train_step(theirs, their_opt, X, Y)
        for name, g in theirs.get_grad_dict().items():
            np.testing.assert_allclose(ours.grads[name], g, rtol=1e-10, atol=1e-15)
    for name, p in theirs.save().items():
        np.testing.assert_allclose(ours.params[name], p, rtol=1e-10)


# -- resume ------------------------------------------------------------------------------------
def train(model, opt, schedule, X, Y, steps: range) -> None:
    for s in steps:
        opt.lr = schedule(s / 4)  # 4 steps an epoch
        batch = np.random.default_rng(s).choice(X.shape[1], 16, replace=False)
        model.forward(X[:, batch])
        model.backward(Y[:, batch])
        opt.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resuming_from_saved_state_is_bit_identical(name, dtype):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(5, 64))
    Y = (X[0] > X[1])[None].astype(float)
    schedule = make_schedule("hyperbolic", LR[name], decay=0.5)

    def fresh():
        model = DeepNetwork([5, 8, 6, 1], ["relu", "tanh", "sigmoid"], dtype=dtype,
                            weight_decay=0.01, dropout=0.2, seed=4)
        return model, make_optimizer(name, model, LR[name], weight_decay=0.001)

    straight, straight_opt = fresh()
    train(straight, straight_opt, schedule, X, Y, range(20))

    first, first_opt = fresh()
    train(first, first_opt, schedule, X, Y, range(9))
    saved = {"model": first.state_dict(), "optimizer": first_opt.state_dict(),
             "model_config": first.config(), "optimizer_config": first_opt.config()}
    train(first, first_opt, schedule, X, Y, range(9, 12))  # the saved state must not move

    for value in [*saved["model"].values(), *saved["optimizer"].values()]:
        assert isinstance(value, (np.ndarray, int, float, str))
    resumed = from_config(saved["model_config"])
    resumed.load_state_dict(saved["model"])
    resumed_opt = make_optimizer(model=resumed, **saved["optimizer_config"])
    resumed_opt.load_state_dict(saved["optimizer"])
    train(resumed, resumed_opt, schedule, X, Y, range(9, 20))

    for key, value in straight.state_dict().items():
        assert np.array_equal(resumed.state_dict()[key], value), key
    for key, value in straight_opt.state_dict().items():
        assert np.array_equal(resumed_opt.state_dict()[key], value), key
