"""The CNN of the recipe and its Adam against PyTorch: from the same weights, the same steps (float64).

What differs by design is not compared: the initial draws (He normal here, PyTorch's default
uniform there) and the augmentation draws (each library's own generator)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from streamnn.nn.models import ConvNet  # noqa: E402
from streamnn.optim import Adam  # noqa: E402


def _torch_twin(model: ConvNet) -> torch.nn.Sequential:
    """The same network in PyTorch (NCHW), holding a copy of the model's weights."""
    layers: list[torch.nn.Module] = []
    c, p = model.image_shape[2], model.params
    for i, filters in enumerate(model.conv):
        conv = torch.nn.Conv2d(c, filters, model.kernel, padding=model.kernel // 2, bias=False)
        conv.weight.data = torch.from_numpy(p[f"conv{i}.W"].transpose(3, 2, 0, 1).copy())
        bn = torch.nn.BatchNorm2d(filters, momentum=0.1, eps=1e-5)  # streamnn's momentum 0.9 keeps, torch's 0.1 takes
        bn.weight.data, bn.bias.data = (torch.from_numpy(p[f"bn{i}.{k}"].ravel().copy()) for k in ("gamma", "beta"))
        layers += [conv, bn, torch.nn.MaxPool2d(2), torch.nn.ReLU()]
        c = filters
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()] if model.head == "gap" else \
        [torch.nn.Flatten()]  # (flatten would need streamnn's HWC order: not compared here)
    for i, units in enumerate([*model.hidden, 1]):
        dense = torch.nn.Linear(c, units)
        dense.weight.data = torch.from_numpy(p[f"dense{i}.W"].copy())
        dense.bias.data = torch.from_numpy(p[f"dense{i}.b"].ravel().copy())
        layers += [dense, torch.nn.ReLU()] if i < len(model.hidden) else [dense]
        c = units
    return torch.nn.Sequential(*layers).double()


def test_a_batch_normed_gap_cnn_trains_as_pytorch_does():
    torch.manual_seed(0)
    H, W, C, B = 12, 12, 3, 8
    model = ConvNet((H, W, C), [4, 6], [5], 2, batch_norm=True, conv_bias=False, head="gap", dtype=np.float64, seed=1)
    twin = _torch_twin(model)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(H * W * C, B)), (rng.random((1, B)) < 0.5).astype(float)
    tx, ty = torch.from_numpy(X.T.reshape(B, H, W, C).transpose(0, 3, 1, 2).copy()), torch.from_numpy(Y.T.copy())
    opt, topt = Adam(model, 1e-2), torch.optim.Adam(twin.parameters(), 1e-2)  # eps 1e-8, bias correction
    for _ in range(4):
        opt.zero_grad()
        out = model.forward(X)
        model.backward(Y)
        opt.step()
        topt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(twin(tx), ty)
        loss.backward()
        topt.step()
        assert model.loss(Y, out) == pytest.approx(float(loss.detach()), rel=1e-12)
    np.testing.assert_allclose(model.params["conv0.W"].transpose(3, 2, 0, 1), twin[0].weight.detach(), atol=1e-12)
    np.testing.assert_allclose(model.params["dense1.W"], twin[-1].weight.detach(), atol=1e-12)
    np.testing.assert_allclose(model.state_dict()["bn1.var"].ravel(), twin[5].running_var, rtol=1e-12)
    with torch.no_grad():
        expected = torch.sigmoid(twin.eval()(tx)).numpy().ravel()
    np.testing.assert_allclose(model.forward(X, False).ravel(), expected, atol=1e-12)
