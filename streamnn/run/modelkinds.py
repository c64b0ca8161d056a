"""The ``--model`` choices: each kind's builder and parameter count, and which options apply to it.

:data:`MODELS` maps a ``--model`` name to its :class:`ModelKind`; :data:`MODEL_OPTIONS` names the
configuration keys of each kind (every other key applies to all). :mod:`streamnn.run.config`
checks a configuration against them and builds its model with them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streamnn.errors import StreamnnError
from streamnn.nn import models
from streamnn.run.budget import conv_parameter_count, dense_parameter_count


@dataclass(frozen=True)
class ModelKind:
    """A ``--model`` choice: its builder, and its parameter count (with a description) for a store."""

    build: Callable[[dict[str, Any], int, int, Any, Any, int], models.Network]
    size: Callable[[dict[str, Any], Any], tuple[int, str]]


def _outputs(n_classes: int) -> int:
    return 1 if n_classes == 2 else n_classes


def _logistic(cfg: dict[str, Any], n_features: int, n_classes: int, image_shape: Any, dtype: Any,
              seed: int) -> models.Network:
    return models.LogisticRegression(n_features, dtype=dtype, weight_decay=cfg["weight_decay"], seed=seed)


def _mlp(cfg: dict[str, Any], n_features: int, n_classes: int, image_shape: Any, dtype: Any,
         seed: int) -> models.Network:
    sizes = [n_features, *cfg["hidden"], _outputs(n_classes)]
    activations = [cfg["activation"]] * len(cfg["hidden"]) + ["sigmoid" if n_classes == 2 else "softmax"]
    return models.DeepNetwork(sizes, activations, dtype=dtype, weight_decay=cfg["weight_decay"],
                              dropout=cfg["dropout"], seed=seed)


def _cnn(cfg: dict[str, Any], n_features: int, n_classes: int, image_shape: Any, dtype: Any,
         seed: int) -> models.Network:
    return models.ConvNet(image_shape, cfg["conv"], cfg["hidden"], n_classes, kernel=cfg["kernel"],
                          batch_norm=cfg["batch_norm"], dtype=dtype, weight_decay=cfg["weight_decay"],
                          dropout=cfg["dropout"], seed=seed, conv_bias=cfg.get("conv_bias", True),
                          head=cfg.get("head", "flatten"), conv_algo=cfg.get("conv_algo", "im2col"))


def _dense_size(cfg: dict[str, Any], store: Any) -> tuple[int, str]:
    sizes = [store.n_features, *(cfg["hidden"] if cfg["model"] == "mlp" else []), _outputs(store.n_classes)]
    return dense_parameter_count(sizes), f"the {cfg['model']} model {sizes}"


def _cnn_size(cfg: dict[str, Any], store: Any) -> tuple[int, str]:
    count = conv_parameter_count(store.image_shape, cfg["conv"], cfg["hidden"], store.n_classes, cfg["kernel"],
                                 cfg["batch_norm"], cfg.get("conv_bias", True), cfg.get("head", "flatten"))
    return count, f"the cnn model (conv {cfg['conv']}, {cfg.get('head', 'flatten')}, hidden {cfg['hidden']})"


#: The ``--model`` choices, each with the builder of its model.
MODELS: dict[str, ModelKind] = {"logistic": ModelKind(_logistic, _dense_size), "mlp": ModelKind(_mlp, _dense_size),
                                "cnn": ModelKind(_cnn, _cnn_size)}
#: Which model options (configuration keys) apply to which model; every other key applies to all.
#: :func:`streamnn.run.config.resolve_config` fills in and checks only these, and the command line refuses the others.
MODEL_OPTIONS: dict[str, frozenset[str]] = {
    "logistic": frozenset(),
    "mlp": frozenset({"hidden", "activation", "dropout"}),
    "cnn": frozenset({"hidden", "dropout", "conv", "kernel", "batch_norm", "head"}),
}
MODEL_SPECIFIC: frozenset[str] = frozenset().union(*MODEL_OPTIONS.values())
assert set(MODEL_OPTIONS) == set(MODELS)


def applicable(config: dict[str, Any], model: str) -> dict[str, Any]:
    """``config`` without the options of other model types (:data:`MODEL_OPTIONS`)."""
    foreign = MODEL_SPECIFIC - MODEL_OPTIONS[model]
    return {k: v for k, v in config.items() if k not in foreign}


def check_applicable(model: str, given: Any) -> None:
    """Refuse options (configuration keys) given for a model they do not apply to, naming them (an
    unknown ``model`` is left to :func:`streamnn.run.config.resolve_config` to report)."""
    if not isinstance(model, str) or model not in MODEL_OPTIONS:
        return
    foreign = sorted(set(given) & (MODEL_SPECIFIC - MODEL_OPTIONS[model]))
    if foreign:
        names = ", ".join("--" + k.replace("_", "-") for k in foreign)
        users = sorted({m for k in foreign for m in MODELS if k in MODEL_OPTIONS[m]})
        raise StreamnnError(f"{names} {'does' if len(foreign) == 1 else 'do'} not apply to --model {model} "
                            f"(only to {', '.join('--model ' + m for m in users)}): drop "
                            f"{'it' if len(foreign) == 1 else 'them'}")
