"""A training run's configuration: defaults, validation against the store, the model it builds.

A run is a *configuration* (a JSON-able dict: :data:`DEFAULTS` completed and checked by
:func:`resolve_config` against the store it trains on) plus an output folder. The same
configuration builds the same model (:func:`build_model`, seeded by :func:`derive_seed`; the
``--model`` kinds are :mod:`streamnn.run.modelkinds`) and the same validation split
(:func:`streamnn.run.selection.split_validation`) on every rank and in every resumed process;
:mod:`streamnn.run.trainer` runs it.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from streamnn.data.order import ORDERS
from streamnn.data.readers import READERS
from streamnn.data.transforms import PADDINGS, Augment
from streamnn.data.remote import is_url
from streamnn.errors import StreamnnError
from streamnn.nn import models
from streamnn.nn.conv import ALGOS
from streamnn.nn.network import COMPUTE_DTYPES
from streamnn.optim.optimizers import OPTIMIZERS
from streamnn.optim.schedules import FORMULAS
from streamnn.threads import check_threads
from streamnn.run.budget import CHECKPOINT_COPIES, INFERENCE_COPIES, TRAINING_COPIES, check_fits
from streamnn.run.modelkinds import MODEL_OPTIONS, MODEL_SPECIFIC, MODELS, applicable

DEFAULTS: dict[str, Any] = {
    "store": None,               # path of the HDF5 store
    "train_split": "train",
    "eval_split": "auto",        # "auto": "test" when the store has it; None: no evaluation split
    "model": "mlp",
    "hidden": [128, 32],
    "conv": [32, 64, 128],       # cnn: channels of each 3x3 conv + ReLU + 2x2 max-pool block
    "kernel": 3,                 # cnn: convolution kernel size (odd)
    "batch_norm": False,         # cnn: BatchNorm after every convolution
    "activation": "relu",
    "optimizer": "adam",
    "optimizer_params": {},      # e.g. {"beta1": 0.9} for adam, {"beta": 0.9} for momentum (streamnn.optim.optimizers)
    "lr": 1e-3,
    "lr_schedule": "constant",
    "schedule_params": {},       # e.g. {"decay": 1.0} for hyperbolic (streamnn.optim.schedules)
    "epochs": 10,
    "batch_size": 64,
    "eval_batch_size": 256,
    "weight_decay": 0.0,
    "dropout": 0.0,
    "standardize": False,
    "augment": None,             # None | any of "flip", "shift", "erase=P" joined by commas (streamnn.data.transforms)
    "shift": 4,                  # shift augmentation: up to this many pixels
    "shift_padding": "reflect",  # shift augmentation: "reflect" | "zero"
    "val_fraction": 0.0,         # seeded, stratified part of the training split used for selection
    "dtype": "float32",
    "seed": 0,
    "order": "exact",            # loader shuffle order: "exact" | "block"
    "reader": "auto",            # loader I/O: "auto" | "mmap" | "pread" (streamnn.data.readers; may change on resume)
    "checkpoint_every": 0,       # steps; 0: only at epoch ends
}
# Schedule parameters (see streamnn.optim.schedules) filled in when not given.
SCHEDULE_DEFAULTS: dict[str, dict[str, float]] = {
    "hyperbolic": {"decay": 1.0}, "step": {"every": 10.0}, "exponential": {"factor": 0.95}}
RESUMABLE = ("epochs", "reader")  # options that may change when a run is resumed

# -- BLAS threads (streamnn.threads): "auto" or a number; may change on resume (not part of the state).
DEFAULTS["threads"] = "auto"
RESUMABLE = (*RESUMABLE, "threads")
# -- cnn: biases of the convolutions; "auto": none before a batch norm (no effect there).
DEFAULTS["conv_bias"] = "auto"
# -- cnn: the convolutions' kernel (streamnn.nn.conv.ALGOS; runs saved without it: "im2col", that of 0.1.0).
DEFAULTS["conv_algo"] = "blocked"
# -- early stopping: stop when the selection accuracy has not improved for this many epochs (0: never);
# may change on resume (the epoch of the best accuracy is in the checkpoint).
DEFAULTS["early_stop"] = 0
RESUMABLE = (*RESUMABLE, "early_stop")
# -- an exponential moving average of the weights for evaluation and checkpoint-best.h5 (0: none; else its
# decay, e.g. 0.999), kept in the optimizer state (streamnn.nn.ema).
DEFAULTS["ema"] = 0.0
# -- label smoothing eps: training targets Y (1 - eps) + eps / K (streamnn.nn.network.Network.label_smoothing).
DEFAULTS["label_smoothing"] = 0.0
# -- cnn: what turns the last conv block into the dense layers' features (streamnn.nn.models.HEADS).
DEFAULTS["head"] = "flatten"


# -- configuration -----------------------------------------------------------------------------
def derive_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for one purpose ("model", "loader", "split") of a run's seed."""
    words = [int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF] + [ord(ch) for ch in purpose]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> np.uint64(1))


def resolve_config(user: dict[str, Any], store: Any) -> dict[str, Any]:
    """Complete and validate a configuration against an open store; raises StreamnnError.

    The model's options (:data:`streamnn.run.modelkinds.MODEL_OPTIONS`) are filled in and checked
    only for the model they apply to: the configuration of a new run holds no option of another
    model type. A key of another model's option that ``user`` holds (a configuration saved by an
    earlier streamnn held every key) is kept as it is, unused, so that an old run resumes bit for
    bit; the command line refuses such an option when it is given
    (:func:`streamnn.run.modelkinds.check_applicable`)."""
    unknown = set(user) - set(DEFAULTS)
    if unknown:
        raise StreamnnError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    model = user.get("model", DEFAULTS["model"])
    if not isinstance(model, str) or model not in MODELS:
        raise StreamnnError(f"model must be one of {', '.join(MODELS)}, not {model!r}")
    cfg = {**applicable(DEFAULTS, model), **user}
    where = cfg["store"] if cfg["store"] is not None else store.path
    cfg["store"] = where if is_url(where) else os.path.abspath(where)  # a URL is kept as given
    uses = MODEL_OPTIONS[model].__contains__

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise StreamnnError(message)

    for key, choices in ((k, c) for k, c in CHOICES.items() if k in cfg):  # (a model option only for its model)
        need(cfg[key] in choices, f"{key.replace('_', '-')} must be one of "
                                  f"{', '.join(str(c) for c in choices)}, not {cfg[key]!r}")
    h, w = store.image_shape[:2]
    if uses("hidden"):
        cfg["hidden"] = [_integer(v, "hidden layer size") for v in _sequence(cfg["hidden"], "hidden")]
        need(all(v > 0 for v in cfg["hidden"]), f"hidden layer sizes must be positive: {cfg['hidden']}")
    if uses("conv"):
        cfg["conv"] = [_integer(c, "conv channel count") for c in _sequence(cfg["conv"], "conv")]
        cfg["kernel"], cfg["batch_norm"] = _integer(cfg["kernel"], "kernel"), bool(cfg["batch_norm"])
        need(all(c > 0 for c in cfg["conv"]), f"conv channel counts must be positive: {cfg['conv']}")
        need(cfg["kernel"] >= 1 and cfg["kernel"] % 2 == 1, f"kernel must be an odd size, not {cfg['kernel']}")
        need(cfg["kernel"] <= 2 * min(h, w) - 1, f"kernel {cfg['kernel']} is wider than the {h}x{w} images")
        need(min(h, w) >= 2 ** len(cfg["conv"]), f"{len(cfg['conv'])} conv blocks halve {h}x{w} images below one "
                                                 "pixel: give fewer --conv entries")
    # augment: its canonical text (Augment.option; that of earlier runs, "flip", "shift", "flip,shift", unchanged)
    augment = Augment.parse(None if cfg["augment"] is None else str(cfg["augment"]))
    need(not augment.shift or "shift=" not in str(cfg["augment"]), "give the shift's size and padding with --shift "
         f"and --shift-padding, not in --augment {cfg['augment']!r}")
    cfg["augment"] = augment.option
    cfg["shift"] = _integer(cfg["shift"], "shift")
    if "shift" in (cfg["augment"] or ""):
        need(1 <= cfg["shift"] < min(h, w), f"shift must be from 1 to {min(h, w) - 1} pixels on {h}x{w} images, "
                                            f"not {cfg['shift']}")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        cfg[key] = _integer(cfg[key], key.replace("_", "-"))
        need(0 < cfg[key] <= MAX_COUNT, f"{key.replace('_', '-')} must be from 1 to {MAX_COUNT:,}, not {cfg[key]}")
    cfg["checkpoint_every"] = _integer(cfg["checkpoint_every"] or 0, "checkpoint-every")
    need(cfg["checkpoint_every"] >= 0, "checkpoint-every must be >= 0 (0: epoch ends only)")
    for key in ("lr", "weight_decay", "val_fraction") + (("dropout",) if uses("dropout") else ()):
        cfg[key] = _number(cfg[key], key.replace("_", "-"))
    need(cfg["lr"] > 0, f"lr must be a positive number, not {cfg['lr']}")
    need(cfg["weight_decay"] >= 0, "weight-decay must be >= 0")
    need(not uses("dropout") or 0 <= cfg["dropout"] < 1, "dropout must be in [0, 1)")
    need(0 <= cfg["val_fraction"] < 1, "val-fraction must be in [0, 1)")
    cfg["seed"] = _integer(cfg["seed"], "seed")
    need(abs(cfg["seed"]) < 1 << 63, f"seed must be a 64-bit integer, not {cfg['seed']}")
    cfg["standardize"] = bool(cfg["standardize"])
    for key in ("optimizer_params", "schedule_params"):
        need(isinstance(cfg[key] or {}, dict), f"{key.replace('_', '-')} must be a mapping of names to values")
    cfg["optimizer_params"] = check_optimizer_params(cfg["optimizer"], dict(cfg["optimizer_params"] or {}))
    cfg["schedule_params"] = {**SCHEDULE_DEFAULTS.get(cfg["lr_schedule"], {}), **(cfg["schedule_params"] or {})}
    if cfg["lr_schedule"] == "cosine":  # fix the period now: extending a run must not change past rates
        cfg["schedule_params"].setdefault("total_epochs", cfg["epochs"])
    from streamnn.optim.schedules import make_schedule

    cfg["schedule_params"] = make_schedule(cfg["lr_schedule"], cfg["lr"], **cfg["schedule_params"]).params
    need(cfg["train_split"] in store.splits, f"the store has no {cfg['train_split']!r} split "
                                             f"(it has {', '.join(store.splits)})")
    if cfg["eval_split"] == "auto":
        cfg["eval_split"] = "test" if "test" in store.splits else None
    if cfg["eval_split"] in ("none", ""):
        cfg["eval_split"] = None
    need(cfg["eval_split"] is None or cfg["eval_split"] in store.splits,
         f"the store has no {cfg['eval_split']!r} split to evaluate on (it has {', '.join(store.splits)}; "
         f"use --eval-split none to skip)")
    need(cfg["eval_split"] != cfg["train_split"], "the evaluation split must differ from the training split")
    need(cfg["eval_split"] is None or store.n_rows(cfg["eval_split"]) > 0,
         f"the store's {cfg['eval_split']!r} split is empty: nothing to evaluate on (use --eval-split none to "
         "train without evaluation)")
    if cfg["standardize"]:
        need(store.stats() is not None, "the store has no /stats (mean, std): repack it, or train without "
                                        "--standardize")
    if cfg["model"] == "logistic":
        need(store.n_classes == 2, f"logistic regression is binary but the store has {store.n_classes} "
                                   "classes: use --model mlp")
    need(store.n_classes >= 2, "the store needs at least two classes")
    cfg["threads"] = check_threads(cfg["threads"])  # BLAS threads: "auto" or a positive number
    cfg["early_stop"] = int(cfg["early_stop"] or 0)
    need(cfg["early_stop"] >= 0, f"early-stop must be >= 0 epochs (0: never), not {cfg['early_stop']}")
    cfg["ema"] = float(cfg["ema"] or 0.0)
    need(0 <= cfg["ema"] < 1, f"ema (the weight average's decay) must be in [0, 1) (0: none), not {cfg['ema']}")
    cfg["label_smoothing"] = float(cfg["label_smoothing"] or 0.0)
    need(0 <= cfg["label_smoothing"] < 1, f"label-smoothing must be in [0, 1), not {cfg['label_smoothing']}")
    if uses("batch_norm"):  # a cnn: no conv bias before a batch norm (it has no effect there)
        cfg["conv_bias"] = not cfg["batch_norm"] if cfg["conv_bias"] == "auto" else bool(cfg["conv_bias"])
    else:  # (set by the library only, so never of another model's command line)
        cfg.pop("conv_bias", None)
    if not uses("conv"):
        cfg.pop("conv_algo", None)
    check_model_size(cfg, store)
    check_batch_size(cfg, store)
    return cfg


#: Largest count of epochs or batch size a configuration may ask for (an absurd value is a typo;
#: layer sizes are bounded by the memory budget).
MAX_COUNT = 1 << 31


def _integer(value: Any, what: str) -> int:
    """An integer option (a whole float such as 3.0 included): anything else is a one-line error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or int(value) != value:
        raise StreamnnError(f"{what} must be an integer, not {value!r}")
    return int(value)


def _sequence(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise StreamnnError(f"{what} must be a list of sizes, not {value!r}")
    return list(value)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise StreamnnError(f"{what} must be a finite number, not {value!r}")
    return float(value)



#: Options that only tune the shift augmentation: given without it, they would change nothing.
SHIFT_OPTIONS = ("shift", "shift_padding")


def check_shift_applies(augment: Any, given: Any) -> None:
    """Refuse ``--shift`` / ``--shift-padding`` (configuration keys in ``given``) for a run whose
    augmentation ``augment`` has no shift, naming them (a bad ``augment`` is left to
    :func:`resolve_config` to report)."""
    options = [k for k in SHIFT_OPTIONS if k in given]
    if not options:
        return
    try:
        shifts = Augment.parse(None if augment is None else str(augment)).shift > 0
    except StreamnnError:
        return
    if not shifts:
        names = " and ".join("--" + k.replace("_", "-") for k in options)
        raise StreamnnError(f"{names} {'applies' if len(options) == 1 else 'apply'} only to the shift augmentation, "
                            f"which --augment {augment or 'none'} does not include: add shift to --augment, or drop "
                            f"{'it' if len(options) == 1 else 'them'}")


def check_batch_size(cfg: dict[str, Any], store: Any) -> None:
    """Refuse, before allocating, batch buffers that exceed the memory available. The loader sizes its
    buffers by the batch size asked for, so a batch size far beyond the split's rows is refused
    here with the number of rows (a batch never holds more than them)."""
    itemsize = np.dtype(cfg["dtype"]).itemsize
    for key, split, copies in (("batch_size", cfg["train_split"], TRAINING_COPIES),
                               ("eval_batch_size", cfg["eval_split"], INFERENCE_COPIES)):
        if split is None:
            continue
        batch, rows = cfg[key], store.n_rows(split)
        try:
            check_fits(batch * store.n_features, itemsize, copies, f"a batch of {batch:,} images", unit="values")
        except StreamnnError as exc:
            raise StreamnnError(f"{key.replace('_', '-')} {batch:,}: {exc}; the {split!r} split has "
                                f"{rows:,} rows") from None


def check_optimizer_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Optimizer parameters checked by name and by type against the optimizer's signature: a
    parameter whose default is a bool takes true/false only, a number a finite number."""
    import inspect

    signature = inspect.signature(OPTIMIZERS[name].__init__)
    accepted = {k: p.default for k, p in signature.parameters.items()
                if k not in ("self", "model", "lr") and p.default is not inspect.Parameter.empty}
    for key, value in params.items():
        if key not in accepted:
            raise StreamnnError(f"the {name} optimizer has no parameter {key!r} (it has {', '.join(accepted)})")
        if isinstance(accepted[key], bool):
            if not isinstance(value, bool):
                raise StreamnnError(f"optimizer parameter {key} must be true or false, not {value!r}")
        elif (isinstance(value, bool) or not isinstance(value, (int, float))
              or not math.isfinite(value)):
            raise StreamnnError(f"optimizer parameter {key} must be a finite number, not {value!r}")
    return params


def check_model_size(cfg: dict[str, Any], store: Any) -> None:
    """Refuse, before allocating, a model whose parameters and buffers exceed the memory available
    (with the copies its checkpoints take)."""
    count, what = MODELS[cfg["model"]].size(cfg, store)
    check_fits(count, np.dtype(cfg["dtype"]).itemsize, TRAINING_COPIES + CHECKPOINT_COPIES, what)


#: Keys newer than release 0.1.0, with the value that means what runs saved without them did: a run's
#: saved configuration holds them only when they differ (:func:`run_settings`), so the configuration of
#: an earlier run, resumed, stays as it was.
LATER_KEYS: dict[str, Any] = {"conv_bias": True, "early_stop": 0, "ema": 0.0, "label_smoothing": 0.0,
                              "head": "flatten", "conv_algo": "im2col"}


def run_settings(cfg: dict[str, Any]) -> str | int:
    """Take from a resolved configuration what a run does not save: the BLAS threads (returned; a
    setting of the process) and the later keys at their earlier meaning."""
    for key, earlier in LATER_KEYS.items():
        if key in cfg and cfg[key] == earlier:
            del cfg[key]
    return cfg.pop("threads")


def build_model(cfg: dict[str, Any], n_features: int, n_classes: int,
                image_shape: tuple[int, ...] | None = None) -> models.Network:
    """A fresh model for the configuration (binary: one sigmoid output; else softmax)."""
    dtype, seed = np.dtype(cfg["dtype"]).type, derive_seed(cfg["seed"], "model")
    model = MODELS[cfg["model"]].build(cfg, n_features, n_classes, image_shape, dtype, seed)
    model.label_smoothing = cfg.get("label_smoothing", 0.0)  # a training setting of the run
    return model


#: The choices :func:`resolve_config` checks, each from the registry that implements it (the CLI offers
#: the same; ``activation``, from :data:`streamnn.nn.functional.ACTIVATIONS`, is checked by the model).
CHOICES: dict[str, tuple[Any, ...]] = {
    "model": tuple(MODELS), "optimizer": tuple(OPTIMIZERS), "lr_schedule": tuple(FORMULAS),
    "dtype": tuple(COMPUTE_DTYPES), "order": tuple(ORDERS),
    "shift_padding": tuple(PADDINGS), "reader": tuple(READERS), "head": tuple(models.HEADS), "conv_algo": ALGOS}
assert MODEL_SPECIFIC <= set(DEFAULTS)
