"""Every choice the commands offer comes from the registry that implements it, and each one builds."""
from __future__ import annotations

import itertools
import re

import click
import numpy as np
import pytest

from streamnn.cli.eval import main as eval_main
from streamnn.cli.pack import main as pack_main
from streamnn.cli.predict import main as predict_main
from streamnn.cli.train import main as train_main
from streamnn.data.format import COMPRESSIONS, STORE_DTYPES
from streamnn.data.loader import Loader
from streamnn.data.order import ORDERS
from streamnn.data.readers import READERS
from streamnn.data.transforms import KINDS, PADDINGS, Augment
from streamnn.nn.functional import ACTIVATIONS
from streamnn.nn.models import HEADS, DeepNetwork
from streamnn.nn.network import COMPUTE_DTYPES
from streamnn.optim.optimizers import OPTIMIZERS, make_optimizer
from streamnn.optim.schedules import FORMULAS, make_schedule
from streamnn.run.config import CHOICES, DEFAULTS, SCHEDULE_DEFAULTS, build_model
from streamnn.run.modelkinds import MODELS
from streamnn.run.predict import TTA
from test_train import make_store

SHAPE = (4, 4, 3)
#: None and every combination of the augmentations (in their order: flip, shift, erase, "flip,shift", ...).
AUGMENTS = (None, *(",".join(c) for n in range(1, len(KINDS) + 1) for c in itertools.combinations(KINDS, n)))

REGISTRIES = {
    ("streamnn-train", "model"): MODELS,
    ("streamnn-train", "optimizer"): OPTIMIZERS,
    ("streamnn-train", "lr_schedule"): FORMULAS,
    ("streamnn-train", "activation"): ACTIVATIONS,
    ("streamnn-train", "dtype"): COMPUTE_DTYPES,
    ("streamnn-train", "reader"): READERS,
    ("streamnn-train", "order"): ORDERS,
    ("streamnn-train", "shift_padding"): PADDINGS,
    ("streamnn-train", "head"): HEADS,
    ("streamnn-eval", "tta"): TTA,
    ("streamnn-predict", "tta"): TTA,
    ("streamnn-pack", "dtype"): STORE_DTYPES,
    ("streamnn-pack", "compression"): [c or "none" for c in COMPRESSIONS],  # None is written "none"
}


def cli_choices() -> dict[tuple[str, str], list[str]]:
    """Every click.Choice option of the commands, by (command, parameter name)."""
    out = {}
    for name, command in (("streamnn-train", train_main), ("streamnn-eval", eval_main),
                          ("streamnn-predict", predict_main), ("streamnn-pack", pack_main)):
        for param in command.params:
            if isinstance(param.type, click.Choice):
                out[name, param.name] = list(param.type.choices)
    return out


def test_cli_choices_are_the_registries_keys():
    choices = cli_choices()
    assert set(choices) == set(REGISTRIES)
    for key, registry in REGISTRIES.items():
        assert choices[key] == list(registry), key


def test_augment_help_names_every_kind():
    """--augment takes a list (not a click.Choice): its help must name every kind the parser accepts."""
    (param,) = [p for p in train_main.params if p.name == "augment"]
    assert all(re.search(rf"\b{kind}\b", param.help) for kind in KINDS), param.help


def test_config_choices_are_the_registries_keys():
    assert CHOICES["model"] == tuple(MODELS) and CHOICES["optimizer"] == tuple(OPTIMIZERS)
    assert CHOICES["lr_schedule"] == tuple(FORMULAS) and CHOICES["dtype"] == tuple(COMPUTE_DTYPES)
    assert CHOICES["reader"] == tuple(READERS) and CHOICES["order"] == tuple(ORDERS)
    assert CHOICES["shift_padding"] == tuple(PADDINGS) and CHOICES["head"] == tuple(HEADS)


def _cfg(**changes):
    return {**DEFAULTS, "hidden": [3], "conv": [2], **changes}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("dtype", list(COMPUTE_DTYPES))
def test_each_model_and_dtype_builds(model, dtype):
    net = build_model(_cfg(model=model, dtype=dtype), int(np.prod(SHAPE)), 2, SHAPE)
    P = net.predict_proba(np.zeros((int(np.prod(SHAPE)), 2), dtype))
    assert P.shape == (1, 2) and net.dtype == COMPUTE_DTYPES[dtype]


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_each_activation_builds(activation):
    net = build_model(_cfg(model="mlp", activation=activation), 5, 3)
    assert isinstance(net, DeepNetwork) and net.activation_func == [activation, "softmax"]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_builds(name):
    optimizer = make_optimizer(name, build_model(_cfg(model="mlp"), 5, 2), 0.1)
    assert isinstance(optimizer, OPTIMIZERS[name])


@pytest.mark.parametrize("name", list(FORMULAS))
def test_each_schedule_builds(name):
    params = {**SCHEDULE_DEFAULTS.get(name, {}), **({"total_epochs": 3} if name == "cosine" else {})}
    assert make_schedule(name, 0.1, **params)(0) == 0.1


@pytest.mark.parametrize("tta", list(TTA))
def test_each_tta_is_a_flag(tta):
    assert isinstance(TTA[tta], bool)


def test_each_loader_choice_reads(tmp_path):
    store = make_store(tmp_path / "s.h5", n_train=8, n_test=4, shape=SHAPE)
    for order in ORDERS:
        for reader in READERS:
            for augment in AUGMENTS:
                for padding in PADDINGS:
                    Augment.parse(augment, padding=padding)
                    with Loader(store, "train", batch_size=4, order=order, reader=reader, augment=augment,
                                shift=1, shift_padding=padding) as loader:
                        X, _ = next(iter(loader))
                    assert X.shape == (int(np.prod(SHAPE)), 4)
