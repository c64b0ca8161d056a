"""The original tutorial's float64 DeepNetwork and Adam: the benchmark's baseline only.

Design. A transcription of the tutorial's in-memory code (DeepNetwork with He init, Adam
with bias correction, the mini-batch training step), kept operation for operation so that
its speed is what the tutorial's speed was. Not part of the library, and not to be fixed:

* every array is float64 and every step allocates new arrays (no ``out=``);
* activations are looked up by name each layer; sigmoid is ``1 / (1 + exp(-z))``,
  ``relu'`` is ``where(z > 0, 1, 0)``;
* backward starts from ``dZ = A - Y`` (sigmoid output), takes ``dW = dZ A^T / m`` and
  ``db = mean(dZ)``, and computes ``dA = W^T dZ`` for every layer, the first included;
* the optimizer keeps its own gradient dict, set to 0 by ``zero_grad`` and filled by
  ``add_grad`` each step, and references to the parameters taken at construction;
* Adam: ``v = b1 v + (1-b1) g``, ``s = b2 s + (1-b2) g^2``, bias-corrected, then
  ``p -= lr v_hat / (sqrt(s_hat) + eps)``.
"""
from __future__ import annotations

from copy import deepcopy

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def sigmoid_de(x: np.ndarray) -> np.ndarray:
    s = sigmoid(x)
    return s * (1 - s)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def relu_de(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, 1, 0)


ACTIVATION = {"sigmoid": sigmoid, "relu": relu}
DERIVATIVE = {"sigmoid": sigmoid_de, "relu": relu_de}


class DeepNetwork:
    """Fully connected network, X features x batch, sigmoid output, float64."""

    def __init__(self, neuron_cnt: list[int], activation_func: list[str]) -> None:
        assert len(neuron_cnt) - 1 == len(activation_func)
        self.num_layer = len(neuron_cnt) - 1
        self.neuron_cnt = neuron_cnt
        self.activation_func = activation_func
        self.W = [np.random.randn(neuron_cnt[i + 1], neuron_cnt[i]) * np.sqrt(2 / neuron_cnt[i])
                  for i in range(self.num_layer)]
        self.b = [np.zeros((neuron_cnt[i + 1], 1)) for i in range(self.num_layer)]
        self.Z_cache = [None] * self.num_layer
        self.A_cache = [None] * (self.num_layer + 1)
        self.dW_cache = [None] * self.num_layer
        self.db_cache = [None] * self.num_layer

    def forward(self, X: np.ndarray, train_mode: bool = True) -> np.ndarray:
        if train_mode:
            self.m = X.shape[1]
        A = X
        self.A_cache[0] = A
        for i in range(self.num_layer):
            Z = np.dot(self.W[i], A) + self.b[i]
            A = ACTIVATION[self.activation_func[i]](Z)
            if train_mode:
                self.Z_cache[i] = Z
                self.A_cache[i + 1] = A
        return A

    def backward(self, Y: np.ndarray) -> None:
        assert self.activation_func[-1] == "sigmoid" and self.neuron_cnt[-1] == 1
        assert self.m == Y.shape[1]
        dA = 0
        for i in range(self.num_layer - 1, -1, -1):
            if i == self.num_layer - 1:
                dZ = self.A_cache[-1] - Y
            else:
                dZ = dA * DERIVATIVE[self.activation_func[i]](self.Z_cache[i])
            dW = np.dot(dZ, self.A_cache[i].T) / self.m
            db = np.mean(dZ, axis=1, keepdims=True)
            dA = np.dot(self.W[i].T, dZ)
            self.dW_cache[i] = dW
            self.db_cache[i] = db

    def get_grad_dict(self) -> dict[str, np.ndarray]:
        grads = {f"W{i}": dW for i, dW in enumerate(self.dW_cache)}
        grads.update({f"b{i}": db for i, db in enumerate(self.db_cache)})
        return grads

    def save(self) -> dict[str, np.ndarray]:
        params = {f"W{i}": W for i, W in enumerate(self.W)}
        params.update({f"b{i}": b for i, b in enumerate(self.b)})
        return params


class Adam:
    """The tutorial's Adam (from scratch, bias correction on), constant learning rate."""

    def __init__(self, param_dict: dict[str, np.ndarray], learning_rate: float,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.param_dict = param_dict
        self.learning_rate = learning_rate
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self._num_step = 0
        self.grad_dict = deepcopy(param_dict)
        self.v_dict = {k: 0 for k in param_dict}
        self.s_dict = {k: 0 for k in param_dict}

    def zero_grad(self) -> None:
        for k in self.grad_dict:
            self.grad_dict[k] = 0

    def add_grad(self, grad_dict: dict[str, np.ndarray]) -> None:
        for k in self.grad_dict:
            self.grad_dict[k] += grad_dict[k]

    def step(self) -> None:
        self._num_step += 1
        for k in self.param_dict:
            self.v_dict[k] = self.beta1 * self.v_dict[k] + (1 - self.beta1) * self.grad_dict[k]
            self.s_dict[k] = (self.beta2 * self.s_dict[k]
                              + (1 - self.beta2) * (self.grad_dict[k] ** 2))
            v = self.v_dict[k] / (1 - self.beta1 ** self._num_step)
            s = self.s_dict[k] / (1 - self.beta2 ** self._num_step)
            self.param_dict[k] -= self.learning_rate * v / (np.sqrt(s) + self.eps)


def train_step(model: DeepNetwork, optimizer: Adam, X: np.ndarray, Y: np.ndarray) -> None:
    """One mini-batch step of the tutorial's training loop."""
    model.forward(X)
    model.backward(Y)
    optimizer.zero_grad()
    optimizer.add_grad(model.get_grad_dict())
    optimizer.step()
