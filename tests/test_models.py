"""Models: construction, initialization, forward/backward numerics, dropout, L2, state."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamnn import StreamnnError
from streamnn.nn.functional import ACTIVATIONS, log_softmax, sigmoid, softmax
from streamnn.nn.losses import BinaryCrossEntropy, CategoricalCrossEntropy
from streamnn.nn.models import DeepNetwork, LogisticRegression, from_config
from streamnn.nn import Activation, Dropout

DTYPES = [np.float32, np.float64]
OUTPUTS = [([6, 5, 4, 1], ["relu", "tanh", "sigmoid"]),
           ([6, 5, 4, 3], ["leaky_relu", "sigmoid", "softmax"])]


def labels(n_classes: int, m: int, seed: int = 0) -> np.ndarray:
    k = np.random.default_rng(seed).integers(0, max(n_classes, 2), m)
    return k[None, :].astype(float) if n_classes == 1 else np.eye(n_classes)[k].T


# -- construction --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_parameters_are_named_shaped_and_typed(dtype):
    model = DeepNetwork([6, 5, 4, 1], ["relu", "tanh", "sigmoid"], dtype=dtype)
    assert list(model.params) == ["W0", "b0", "W1", "b1", "W2", "b2"]
    assert list(model.grads) == list(model.params)
    shapes = {"W0": (5, 6), "b0": (5, 1), "W1": (4, 5), "b1": (4, 1), "W2": (1, 4), "b2": (1, 1)}
    for name, p in model.params.items():
        assert p.shape == model.grads[name].shape == shapes[name]
        assert p.dtype == model.grads[name].dtype == np.dtype(dtype)
    assert model.n_classes == 1 and not model.params["b1"].any()


def test_logistic_regression_is_one_zero_initialized_neuron():
    model = LogisticRegression(7, dtype=np.float64)
    assert list(model.params) == ["W0", "b0"] and model.params["W0"].shape == (1, 7)
    assert not model.params["W0"].any() and model.n_classes == 1
    assert from_config(json.loads(json.dumps(model.config()))).config() == model.config()


@pytest.mark.parametrize("act,var", [("relu", lambda i, o: 2 / i),
                                     ("leaky_relu", lambda i, o: 2 / i),
                                     ("tanh", lambda i, o: 2 / (i + o)),
                                     ("sigmoid", lambda i, o: 2 / (i + o))])
def test_he_and_xavier_initialization(act, var):
    model = DeepNetwork([400, 300, 1], [act, "sigmoid"], dtype=np.float64)
    W, std = model.params["W0"], np.sqrt(var(400, 300))
    assert abs(W.mean()) < 0.05 * std
    assert W.std() == pytest.approx(std, rel=0.02)
    assert ACTIVATIONS[act].init == ("he" if "relu" in act else "xavier")


def test_same_seed_same_start_in_both_dtypes_and_from_config():
    a = DeepNetwork([6, 5, 3], ["tanh", "softmax"], seed=3)
    b = DeepNetwork([6, 5, 3], ["tanh", "softmax"], dtype="float64", seed=3)
    c = from_config(json.loads(json.dumps(a.config())))
    other = DeepNetwork([6, 5, 3], ["tanh", "softmax"], seed=4)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name].astype(np.float32))
        np.testing.assert_array_equal(a.params[name], c.params[name])
    assert not np.array_equal(a.params["W0"], other.params["W0"])


@pytest.mark.parametrize("cfg", [
    {"type": "DeepNetwork", "neuron_cnt": [3], "activation_func": []},
    {"type": "DeepNetwork", "neuron_cnt": [3, 0, 1], "activation_func": ["relu", "sigmoid"]},
    {"type": "DeepNetwork", "neuron_cnt": [3, 2, 1], "activation_func": ["sigmoid"]},
    {"type": "DeepNetwork", "neuron_cnt": [3, 2, 1], "activation_func": ["swish", "sigmoid"]},
    {"type": "DeepNetwork", "neuron_cnt": [3, 2, 1], "activation_func": ["softmax", "sigmoid"]},
    {"type": "DeepNetwork", "neuron_cnt": [3, 2, 2], "activation_func": ["relu", "sigmoid"]},
    {"type": "DeepNetwork", "neuron_cnt": [3, 2, 1], "activation_func": ["relu", "softmax"]},
    {"type": "DeepNetwork", "neuron_cnt": [3, 2, 1], "activation_func": ["relu", "relu"]},
    {"type": "DeepNetwork", "neuron_cnt": [3, 1], "activation_func": ["sigmoid"], "dtype": "float16"},
    {"type": "DeepNetwork", "neuron_cnt": [3, 1], "activation_func": ["sigmoid"], "dropout": 1.0},
    {"type": "DeepNetwork", "neuron_cnt": [3, 1], "activation_func": ["sigmoid"],
     "weight_decay": -1},
    {"type": "DeepNetwork", "neuron_cnt": [3, 1], "activation_func": ["sigmoid"], "colour": 1},
    {"type": "Transformer"},
    {"type": "LogisticRegression", "n_features": "many"},
])
def test_bad_configs_raise_one_line_errors(cfg):
    with pytest.raises(StreamnnError) as info:
        from_config(cfg)
    assert "\n" not in str(info.value)


# -- output functions and losses -----------------------------------------------------------
finite = st.floats(-30, 30, allow_nan=False)


@given(st.lists(finite, min_size=1, max_size=8))
def test_sigmoid_matches_its_formula_and_symmetry(zs):
    Z = np.array([zs])
    np.testing.assert_allclose(sigmoid(Z), 1 / (1 + np.exp(-Z)), rtol=1e-12)
    np.testing.assert_allclose(sigmoid(-Z), 1 - sigmoid(Z), atol=1e-15)


@given(st.lists(finite, min_size=2, max_size=6), st.floats(-1e3, 1e3))
def test_softmax_sums_to_one_and_ignores_shifts(zs, shift):
    Z = np.array(zs)[:, None]
    np.testing.assert_allclose(softmax(Z).sum(axis=0), 1)
    np.testing.assert_allclose(softmax(Z + shift), softmax(Z), atol=1e-12)
    np.testing.assert_allclose(log_softmax(Z), np.log(np.exp(Z) / np.exp(Z).sum()), atol=1e-9)


@given(st.lists(st.tuples(st.floats(-15, 15), st.booleans()), min_size=1, max_size=8))
def test_binary_cross_entropy_from_logits_matches_the_naive_formula(pairs):
    Z = np.array([[z for z, _ in pairs]])
    Y = np.array([[float(y) for _, y in pairs]])
    A = 1 / (1 + np.exp(-Z))
    naive = -np.mean(Y * np.log(A) + (1 - Y) * np.log(1 - A))
    assert BinaryCrossEntropy.from_logits(Z, Y) == pytest.approx(naive, rel=1e-8, abs=1e-12)
    assert BinaryCrossEntropy.from_probabilities(A, Y) == pytest.approx(naive, rel=1e-6,
                                                                       abs=1e-12)


def test_categorical_cross_entropy_from_logits_matches_the_naive_formula():
    Z = np.random.default_rng(0).normal(0, 3, (4, 9))
    Y = labels(4, 9)
    naive = -np.mean(np.sum(Y * np.log(np.exp(Z) / np.exp(Z).sum(axis=0)), axis=0))
    assert CategoricalCrossEntropy.from_logits(Z, Y) == pytest.approx(naive, rel=1e-12)
    assert CategoricalCrossEntropy.from_probabilities(softmax(Z), Y) == pytest.approx(naive)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_logistic_loss_is_exact_from_logits(dtype):
    model = LogisticRegression(2, dtype=dtype)
    model.params["W0"][:] = [[100, 0]]
    X = np.array([[1.0, -1.0], [0.0, 0.0]])  # logits +100 and -100
    wrong, right = np.array([[0, 1]]), np.array([[1, 0]])
    Y_hat = model.forward(X)
    assert model.loss(wrong, Y_hat) == pytest.approx(100, rel=1e-6)  # both wrong by 100
    assert model.loss(right, Y_hat) == pytest.approx(0, abs=1e-30)
    fallback = model.loss(wrong, Y_hat.copy())  # unknown logits: clipped, finite
    assert np.isfinite(fallback) and fallback > 10


# -- numerics on extreme inputs ------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neuron_cnt,acts", OUTPUTS)
@pytest.mark.parametrize("fill", ["huge", "zeros", "ones", "-huge"])
def test_no_nan_or_inf_on_extreme_inputs(dtype, neuron_cnt, acts, fill):
    model = DeepNetwork(neuron_cnt, acts, dtype=dtype, weight_decay=0.1, dropout=0.3)
    for p in model.params.values():
        p *= 50  # saturate every layer
    X = {"huge": np.full((6, 5), 1e4), "-huge": np.full((6, 5), -1e4),
         "zeros": np.zeros((6, 5)), "ones": np.ones((6, 5))}[fill]
    for Y in (labels(model.n_classes, 5), np.zeros((model.n_classes, 5)),
              np.ones((model.n_classes, 5)) / (1 if model.n_classes == 1 else model.n_classes)):
        Y_hat = model.forward(X)
        model.backward(Y)
        assert np.all((Y_hat >= 0) & (Y_hat <= 1))
        assert np.isfinite(model.loss(Y, Y_hat))
        assert all(np.isfinite(g).all() for g in model.grads.values())
        assert np.isfinite(model.evaluate(X, Y)["loss"])


@pytest.mark.parametrize("neuron_cnt,acts", OUTPUTS)
def test_float32_model_never_upcasts(neuron_cnt, acts):
    model = DeepNetwork(neuron_cnt, acts, weight_decay=0.1, dropout=0.2)
    X = np.random.default_rng(0).normal(size=(6, 5))  # float64 input
    Y_hat = model.forward(X)
    model.backward(labels(model.n_classes, 5))
    assert Y_hat.dtype == np.float32
    assert all(g.dtype == np.float32 for g in model.grads.values())
    cached = [layer._cache[0] for layer in model.layers if isinstance(layer, Activation)]
    cached += [layer.mask for layer in model.layers if isinstance(layer, Dropout)]
    assert cached and all(z.dtype == np.float32 for z in cached)
    assert model.flat_params.dtype == model.flat_grads.dtype == np.float32


def test_float32_and_float64_models_agree():
    a = DeepNetwork([6, 5, 4, 3], ["tanh", "relu", "softmax"], seed=1)
    b = DeepNetwork([6, 5, 4, 3], ["tanh", "relu", "softmax"], dtype=np.float64, seed=1)
    X, Y = np.random.default_rng(1).normal(size=(6, 8)), labels(3, 8)
    np.testing.assert_allclose(a.forward(X), b.forward(X), rtol=1e-5)
    a.backward(Y)
    b.backward(Y)
    for name in a.grads:
        np.testing.assert_allclose(a.grads[name], b.grads[name], rtol=1e-4, atol=1e-6)


# -- forward / backward contract -----------------------------------------------------------
def test_predict_proba_and_evaluate():
    model = DeepNetwork([6, 5, 3], ["relu", "softmax"], dtype=np.float64)
    X, Y = np.random.default_rng(2).normal(size=(6, 10)), labels(3, 10)
    P = model.predict_proba(X)
    np.testing.assert_allclose(P.sum(axis=0), 1)
    result = model.evaluate(X, Y)
    assert result["accuracy"] == np.mean(P.argmax(axis=0) == Y.argmax(axis=0))
    assert result["loss"] == pytest.approx(-np.mean(np.log(P[Y.argmax(axis=0), range(10)])))


def test_binary_accuracy_thresholds_at_one_half():
    model = LogisticRegression(1, dtype=np.float64)
    model.params["W0"][:] = 1
    X = np.array([[-2.0, -1.0, 1.0, 2.0]])
    assert model.evaluate(X, np.array([[0, 0, 1, 0]]))["accuracy"] == 0.75


def test_misuse_is_reported():
    model = DeepNetwork([3, 2, 1], ["relu", "sigmoid"])
    with pytest.raises(RuntimeError):
        model.backward(np.zeros((1, 4)))
    with pytest.raises(StreamnnError):
        model.forward(np.zeros((4, 2)))
    model.forward(np.zeros((3, 4)))
    with pytest.raises(StreamnnError):
        model.backward(np.zeros((1, 5)))
    model.predict_proba(np.zeros((3, 7)))  # eval mode keeps the train-mode cache
    model.backward(np.zeros((1, 4)))


def test_forward_returns_fresh_arrays():
    model = DeepNetwork([3, 2, 1], ["relu", "sigmoid"])
    first = model.forward(np.ones((3, 4)))
    kept = first.copy()
    model.forward(np.zeros((3, 4)))
    np.testing.assert_array_equal(first, kept)


# -- regularization ------------------------------------------------------------------------
def test_l2_term_of_loss_and_gradient():
    plain = DeepNetwork([4, 3, 1], ["tanh", "sigmoid"], dtype=np.float64)
    decayed = DeepNetwork([4, 3, 1], ["tanh", "sigmoid"], dtype=np.float64, weight_decay=0.7)
    X, Y = np.random.default_rng(3).normal(size=(4, 5)), labels(1, 5)
    squares = sum(np.sum(plain.params[w] ** 2) for w in ("W0", "W1"))
    assert decayed.loss(Y, decayed.forward(X)) == pytest.approx(
        plain.loss(Y, plain.forward(X)) + 0.7 / (2 * 5) * squares)
    plain.backward(Y)
    decayed.backward(Y)
    for name in plain.params:
        extra = 0.7 / 5 * plain.params[name] if name.startswith("W") else 0
        np.testing.assert_allclose(decayed.grads[name], plain.grads[name] + extra)


def test_inverted_dropout_only_in_train_mode():
    model = DeepNetwork([20, 400, 1], ["relu", "sigmoid"], dropout=0.25, seed=5)
    X = np.abs(np.random.default_rng(4).normal(size=(20, 50)))
    dense0, relu, dropout, dense1 = model.layers
    model.forward(X)
    mask = dropout.mask
    assert set(np.unique(mask)) == {0, np.float32(1 / 0.75)}
    assert np.mean(mask == 0) == pytest.approx(0.25, abs=0.01)
    np.testing.assert_array_equal(dense1._A, relu._cache[1] * mask)
    P = model.predict_proba(X)
    np.testing.assert_array_equal(P, model.predict_proba(X))  # no randomness in eval mode
    model.forward(X)
    assert not np.array_equal(mask, dropout.mask)  # fresh masks each train pass


def test_dropout_masks_follow_the_generator_state():
    model = DeepNetwork([5, 30, 1], ["relu", "sigmoid"], dropout=0.5, seed=6)
    X = np.ones((5, 8))
    state = model.state_dict()
    first = model.forward(X)
    model.load_state_dict(state)
    np.testing.assert_array_equal(model.forward(X), first)


# -- state ---------------------------------------------------------------------------------
def test_state_dict_is_plain_copies_and_round_trips():
    model = DeepNetwork([4, 3, 2], ["tanh", "softmax"], seed=7)
    state = model.state_dict()
    assert set(state) == {"W0", "b0", "W1", "b1", "rng"}
    assert all(isinstance(v, np.ndarray) for k, v in state.items() if k != "rng")
    json.loads(state["rng"])
    before = {k: v.copy() for k, v in model.params.items()}
    for p in model.params.values():
        p += 1  # the state holds copies, not views
    np.testing.assert_array_equal(state["W0"], before["W0"])
    held = model.params["W0"]
    model.load_state_dict(state)
    assert model.params["W0"] is held  # loaded in place: outside references stay live
    for name in before:
        np.testing.assert_array_equal(model.params[name], before[name])


@pytest.mark.parametrize("corrupt", [
    lambda s: s.pop("b1"),
    lambda s: s.update(extra=np.zeros(1)),
    lambda s: s.update(W1=np.zeros((3, 3), np.float32)),
    lambda s: s.update(W1=s["W1"].astype(np.float64)),
    lambda s: s.update(W1=s["W1"].tolist()),
    lambda s: s.update(rng="{}"),
    lambda s: s.update(rng=json.dumps({"bit_generator": "MT19937", "state": {}})),
])
def test_load_state_dict_checks_before_changing_anything(corrupt):
    model = DeepNetwork([4, 3, 2], ["tanh", "softmax"], seed=7)
    state = DeepNetwork([4, 3, 2], ["tanh", "softmax"], seed=8).state_dict()
    corrupt(state)
    before = model.state_dict()
    with pytest.raises(StreamnnError) as info:
        model.load_state_dict(state)
    assert "\n" not in str(info.value)
    after = model.state_dict()
    assert after["rng"] == before["rng"]
    for name in model.params:
        np.testing.assert_array_equal(after[name], before[name])


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       act=st.sampled_from(sorted(ACTIVATIONS)), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(["float32", "float64"]))
def test_config_and_state_rebuild_an_identical_model(sizes, act, seed, dtype):
    model = DeepNetwork([3, *sizes, 1], [act] * len(sizes) + ["sigmoid"], dtype=dtype,
                        dropout=0.1, seed=seed)
    model.forward(np.ones((3, 2)))  # advance the generator
    copy = from_config(json.loads(json.dumps(model.config())))
    copy.load_state_dict(model.state_dict())
    X = np.random.default_rng(0).normal(size=(3, 4))
    np.testing.assert_array_equal(copy.forward(X), model.forward(X))


def test_training_a_batch_normed_cnn_drops_its_conv_biases_and_resumes_exactly(tmp_path):
    """New batch-normed CNN runs have no conv bias (saved as conv_bias false); others keep theirs."""
    from streamnn.run.trainer import Trainer
    from test_train import assert_same_run, make_store

    store = make_store(tmp_path / "s.h5", n_train=24, n_test=8)
    base = {"store": str(store), "model": "cnn", "conv": [2], "hidden": [3], "batch_size": 8, "epochs": 2,
            "eval_split": None, "checkpoint_every": 1}
    with Trainer({**base, "batch_norm": True}, tmp_path / "bn", verbose=False) as t:
        assert t.config["conv_bias"] is False and "conv0.b" not in t.model.params
        t.fit()
    with Trainer.resume(tmp_path / "bn", verbose=False) as t:
        assert "conv0.b" not in t.model.params
    with Trainer(base, tmp_path / "plain", verbose=False) as t:
        assert "conv_bias" not in t.config and "conv0.b" in t.model.params
    with Trainer({**base, "batch_norm": True, "conv_bias": True}, tmp_path / "kept", verbose=False) as t:
        assert "conv0.b" in t.model.params

    def stop_at_3(t):
        if t.step == 3:
            t.request_stop()

    import pytest
    from streamnn.run.stop import TrainingInterrupted
    with Trainer({**base, "batch_norm": True}, tmp_path / "stopped", verbose=False) as t:
        with pytest.raises(TrainingInterrupted):
            t.fit(on_step=stop_at_3)
    with Trainer.resume(tmp_path / "stopped", verbose=False) as t:
        t.fit()
    assert_same_run(tmp_path / "bn", tmp_path / "stopped")


def test_a_gap_head_averages_the_last_block_and_is_saved_only_when_chosen():
    """The gap head's features are the channel means of what a flatten head would see; the flatten head
    (the default) is absent from the config, so configs of earlier models (no "head") load as flatten."""
    from streamnn.nn.models import ConvNet

    X = np.random.default_rng(0).normal(size=(8 * 8 * 3, 4))
    flat = ConvNet((8, 8, 3), [4, 5], [], 2, seed=3)
    gap = ConvNet((8, 8, 3), [4, 5], [], 2, seed=3, head="gap")
    assert "head" not in flat.config() and gap.config()["head"] == "gap"
    assert flat.params["dense0.W"].shape == (1, 2 * 2 * 5) and gap.params["dense0.W"].shape == (1, 5)
    for name in ("conv0.W", "conv1.W"):  # the same draws for the conv layers
        np.testing.assert_array_equal(flat.params[name], gap.params[name])
    blocks = flat.layers[:-2]  # up to the flatten
    images = X.T.reshape(4, 8, 8, 3)
    for layer in blocks:
        images = layer.forward(images, False)
    features = images.mean(axis=(1, 2)).T
    W, b = gap.params["dense0.W"], gap.params["dense0.b"]
    np.testing.assert_allclose(gap.forward(X, False), sigmoid(W @ features + b), rtol=1e-5)
    old = {k: v for k, v in gap.config().items() if k != "head"}
    assert from_config(old).config() == flat.config()
    rebuilt = from_config(json.loads(json.dumps(gap.config())))
    rebuilt.load_state_dict(gap.state_dict())
    np.testing.assert_array_equal(rebuilt.forward(X, False), gap.forward(X, False))
    with pytest.raises(StreamnnError, match="unknown ConvNet head 'max'; choose from flatten, gap"):
        ConvNet((8, 8, 3), [4], [], 2, head="max")
