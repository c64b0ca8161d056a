"""Layers that work in blocks of images on the worker threads. The "blocked" convolution kernel of new CNN runs:
the loop reference, gradient checks, the same numbers at any worker count, blocks and bands of any size; new runs
save the kernel and old ones keep theirs. MaxPool2D and BatchNorm in blocks give the numbers of one whole-batch
pass of their formulas, bit for bit."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamnn import StreamnnError, threads
from streamnn.nn import BatchNorm, Conv2D, MaxPool2D, layer_from_config
from streamnn.nn import conv as conv_module
from streamnn.nn import norm as norm_module
from streamnn.nn import pool as pool_module
from streamnn.nn.gradcheck import gradient_check, layer_gradient_errors
from streamnn.nn.models import ConvNet, from_config
from streamnn.rng import make_rng
from streamnn.run.trainer import Trainer
from test_nn_layers import conv_backward_reference, conv_reference
from test_train import assert_same_run, make_store

TOL = 1e-6


@contextlib.contextmanager
def setting(module, name: str, value, n_workers: int):
    """``module.name = value`` and ``n_workers`` worker threads, both put back afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, value)
        threads.set_workers(n_workers)
        try:
            yield
        finally:
            threads.set_workers(1)


def built(layer, shape, dtype=np.float64, seed=0):
    layer.build(shape, make_rng(seed), np.dtype(dtype))
    return layer


def forward_backward(layer, X, dY):
    Y = layer.forward(X).copy()
    dX = layer.backward(dY)
    return Y, None if dX is None else dX.copy(), {k: g.copy() for k, g in layer.grads.items()}


shapes = st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4),
                   st.sampled_from([1, 2, 3, 5]), st.sampled_from([1, 2]), st.sampled_from(["same", "valid"]))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, block_rows=st.sampled_from([1, 3, 7, 20, 1024]), n_workers=st.sampled_from([1, 3]),
       bias=st.booleans(), seed=st.integers(0, 99))
def test_blocked_conv_matches_the_loop_reference(shape, block_rows, n_workers, bias, seed):
    """Blocks of images and bands of rows (small BLOCK_ROWS), any kernel, stride, padding, on 1 or 3 workers."""
    h, w, c, f, b, k, s, padding = shape
    if padding == "valid" and (k > h or k > w):
        return
    with setting(conv_module, "BLOCK_ROWS", block_rows, n_workers):
        check_against_reference(h, w, c, f, b, k, s, padding, bias, seed)


def check_against_reference(h, w, c, f, b, k, s, padding, bias, seed):
    layer = built(Conv2D(f, k, s, padding, bias=bias, algo="blocked"), (h, w, c), seed=seed)
    rng = np.random.default_rng(seed)
    if bias:
        layer.params["b"][...] = rng.normal(size=f)
    X = rng.normal(size=(b, h, w, c))
    Y = layer.forward(X)
    pad = k // 2 if padding == "same" else 0
    b_ref = layer.params["b"] if bias else np.zeros(f)
    np.testing.assert_allclose(Y, conv_reference(X, layer.params["W"], b_ref, s, pad), atol=1e-12)
    dY = rng.normal(size=Y.shape)
    dX = layer.backward(dY)
    dX_ref, dW_ref, db_ref = conv_backward_reference(X, layer.params["W"], dY, s, pad)
    np.testing.assert_allclose(dX, dX_ref, atol=1e-12)
    np.testing.assert_allclose(layer.grads["W"], dW_ref, atol=1e-12)
    if bias:
        np.testing.assert_allclose(layer.grads["b"], db_ref, atol=1e-12)


@pytest.mark.parametrize("k,s,padding", [(3, 1, "same"), (3, 2, "same"), (5, 1, "same"), (5, 2, "valid"),
                                         (3, 1, "valid"), (2, 1, "same")])
def test_gradient_check_of_the_blocked_conv(k, s, padding):
    with setting(conv_module, "BLOCK_ROWS", 6, 2):  # bands of rows and blocks of images, 2 workers
        layer = built(Conv2D(3, k, s, padding, algo="blocked"), (7, 6, 2), seed=3)
        rng = np.random.default_rng(4)
        for p in layer.params.values():
            p[...] = rng.normal(0, 0.8, p.shape)
        errors = layer_gradient_errors(layer, rng.normal(size=(3, 7, 6, 2)))
    assert set(errors) == {"W", "b", "input"} and max(errors.values()) < TOL, errors


def test_blocked_numbers_do_not_depend_on_the_worker_count():
    """Every block is computed alike whichever thread takes it, and the partial sums are added in block
    order: float32 results bit for bit equal on 1, 2 and 3 workers (several blocks and bands here)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 40, 36, 3)).astype(np.float32)
    dY = rng.normal(size=(10, 40, 36, 8)).astype(np.float32)
    results = []
    for n in (1, 2, 3):
        with setting(conv_module, "BLOCK_ROWS", conv_module.BLOCK_ROWS, n):
            layer = built(Conv2D(8, 3, algo="blocked"), (40, 36, 3), dtype=np.float32, seed=5)
            results.append(forward_backward(layer, X, dY))
    for Y, dX, grads in results[1:]:
        assert np.array_equal(Y, results[0][0]) and np.array_equal(dX, results[0][1])
        assert all(np.array_equal(g, results[0][2][k]) for k, g in grads.items())


def test_blocked_conv_without_input_gradient_and_on_an_empty_share():
    layer = built(Conv2D(4, 3, algo="blocked"), (5, 5, 2), seed=1)
    layer.needs_input_grad = False
    X = np.random.default_rng(0).normal(size=(3, 5, 5, 2))
    layer.forward(X)
    assert layer.backward(np.ones((3, 5, 5, 4))) is None
    np.testing.assert_allclose(layer.grads["b"], 3 * 25)
    layer.forward(X[:0])  # an empty rank's share: zero gradients
    assert layer.backward(np.ones((0, 5, 5, 4))) is None
    assert not layer.grads["W"].any() and not layer.grads["b"].any()
    with pytest.raises(RuntimeError):
        layer.backward(np.ones((0, 5, 5, 4)))  # no train-mode forward since


def test_the_kernel_is_in_the_config_only_when_blocked():
    old, new = Conv2D(4, 3), Conv2D(4, 3, algo="blocked")
    assert "algo" not in old.config() and new.config()["algo"] == "blocked"
    assert layer_from_config(new.config()).algo == "blocked" and layer_from_config(old.config()).algo == "im2col"
    assert new.uses_workers and not old.uses_workers
    with pytest.raises(StreamnnError, match="algo must be one of"):
        Conv2D(4, 3, algo="fft")
    net = ConvNet((8, 8, 3), [4], [5], 2, conv_algo="blocked")
    assert net.config()["conv_algo"] == "blocked" and from_config(net.config()).layers[0].algo == "blocked"
    assert "conv_algo" not in ConvNet((8, 8, 3), [4], [5], 2).config()  # configs of earlier models unchanged
    assert threads.computes_in_blocks(net) and not threads.computes_in_blocks(ConvNet((8, 8, 3), [4], [5], 2))


def test_gradient_check_of_a_blocked_cnn(monkeypatch):
    monkeypatch.setattr(conv_module, "BLOCK_ROWS", 10)
    rng = np.random.default_rng(0)
    model = ConvNet((6, 6, 2), [2, 3], [3], 3, dropout=0.2, dtype=np.float64, weight_decay=0.05, seed=2,
                    conv_algo="blocked")
    for name, p in model.params.items():
        if name.endswith(".b"):
            p[...] = rng.normal(0, 0.3, p.shape)
    assert gradient_check(model, rng.normal(size=(72, 5)), np.eye(3)[[0, 2, 1, 2, 0]].T) < TOL
    normed = ConvNet((6, 6, 1), [2], [3], 2, batch_norm=True, conv_bias=False, dtype=np.float64, seed=1,
                     conv_algo="blocked")
    assert gradient_check(normed, rng.normal(size=(36, 4)), np.array([[0, 1, 1, 0.0]])) < TOL


@settings(max_examples=30, deadline=None)
@given(h=st.integers(2, 9), w=st.integers(2, 9), c=st.integers(1, 3), b=st.integers(1, 7), block=st.integers(1, 40),
       ties=st.booleans(), seed=st.integers(0, 99))
def test_maxpool_in_blocks_gives_the_numbers_of_one_pass(h, w, c, b, block, ties, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(b, h, w, c)).astype(np.float32)
    if ties:
        X = np.round(X)
    dY = rng.normal(size=(b, h // 2, w // 2, c)).astype(np.float32)
    whole = built(MaxPool2D(), (h, w, c), np.float32)
    Y, dX = whole.forward(X).copy(), whole.backward(dY).copy()
    with setting(pool_module, "POOL_BLOCK", block, 3):
        blocked = built(MaxPool2D(), (h, w, c), np.float32)
        assert np.array_equal(blocked.forward(X), Y) and np.array_equal(blocked.backward(dY), dX)


def batch_norm_formulas(X, dY, gamma, beta, eps=1e-5):
    """The batch norm of conv outputs as whole-batch array expressions (the module docstring's formulas)."""
    axes = (0, 1, 2)
    mu = X.mean(axis=axes, keepdims=True)
    centred = X - mu
    var = np.mean(centred * centred, axis=axes, keepdims=True)
    inv = 1 / np.sqrt(var + eps)
    x_hat = centred * inv
    Y = x_hat * gamma + beta
    dx_hat = dY * gamma
    dX = dx_hat - dx_hat.mean(axis=axes, keepdims=True)
    dX -= x_hat * np.mean(dx_hat * x_hat, axis=axes, keepdims=True)
    dX *= inv
    return Y, dX, np.sum(dY * x_hat, axis=axes), np.sum(dY, axis=axes)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), c=st.integers(1, 4), b=st.integers(2, 7), block=st.integers(1, 60),
       n_workers=st.sampled_from([1, 3]), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 99))
def test_batch_norm_in_blocks_gives_the_numbers_of_its_formulas(h, w, c, b, block, n_workers, dtype, seed):
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(b, h, w, c)) * 3 + 1).astype(dtype)
    dY = rng.normal(size=X.shape).astype(dtype)
    with setting(norm_module, "NORM_BLOCK", block, n_workers):
        layer = built(BatchNorm(), (h, w, c), dtype)
        layer.params["gamma"][...] = rng.normal(size=c)
        layer.params["beta"][...] = rng.normal(size=c)
        gamma, beta = layer.params["gamma"].reshape(1, 1, 1, c), layer.params["beta"].reshape(1, 1, 1, c)
        expected = batch_norm_formulas(X, dY, gamma, beta)
        got = (layer.forward(X).copy(), layer.backward(dY).copy(), layer.grads["gamma"], layer.grads["beta"])
        assert all(np.array_equal(g, e) and g.dtype == e.dtype for g, e in zip(got, expected))
        mean, var = layer.state["mean"].reshape(gamma.shape), layer.state["var"].reshape(gamma.shape)
        assert np.array_equal(layer.forward(X, False), (X - mean) * (1 / np.sqrt(var + 1e-5)) * gamma + beta)


# -- training --------------------------------------------------------------------------------
CNN = dict(model="cnn", conv=[3, 4], hidden=[5], epochs=1, batch_size=8, eval_batch_size=8, augment="flip",
           standardize=True, dropout=0.2, checkpoint_every=2, seed=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "s.h5", n_train=24, n_test=8, shape=(8, 8, 3))


def test_new_cnn_runs_use_the_blocked_kernel_and_give_the_same_numbers_at_any_thread_count(store, tmp_path):
    """Worker threads (BLAS at 1) for any --threads, so runs at 1 and 2 threads are bit-identical."""
    try:
        for n in (1, 2):
            with Trainer({"store": str(store), **CNN, "threads": n}, tmp_path / f"t{n}", verbose=False) as t:
                t.fit()
                assert t.config["conv_algo"] == "blocked" and t.model.config()["conv_algo"] == "blocked"
                assert threads.workers() == n and threads.blas_threads() in (1, None)
    finally:
        threads.set_workers(1)
    assert json.loads((tmp_path / "t1" / "config.json").read_text())["conv_algo"] == "blocked"
    assert_same_run(tmp_path / "t1", tmp_path / "t2")


def test_a_run_saved_without_the_key_keeps_the_0_1_0_kernel(store, tmp_path):
    with Trainer({"store": str(store), **CNN, "conv_algo": "im2col"}, tmp_path / "old",
                 verbose=False) as t:
        t.fit()
        assert t.model.layers[0].algo == "im2col" and threads.workers() == 1
    assert "conv_algo" not in json.loads((tmp_path / "old" / "config.json").read_text())  # as 0.1.0 wrote it
    with Trainer.resume(tmp_path / "old", changes={"epochs": 2}, verbose=False) as t:
        assert t.model.layers[0].algo == "im2col"
    with pytest.raises(StreamnnError, match="conv-algo must be one of"):
        Trainer({"store": str(store), **CNN, "conv_algo": "fft"}, tmp_path / "bad", verbose=False)
    with Trainer({"store": str(store), "model": "mlp", "hidden": [4], "epochs": 1}, tmp_path / "mlp",
                 verbose=False) as t:
        assert "conv_algo" not in t.config
