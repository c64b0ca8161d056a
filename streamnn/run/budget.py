"""Memory budget: refuse a model that cannot fit before allocating it.

A model's size follows from its configuration: a dense layer of ``n_in`` inputs and ``n_out`` units
holds ``n_out * (n_in + 1)`` parameters; a ``k x k`` convolution of ``c_in`` to ``c_out`` channels
``c_out * (k * k * c_in + 1)`` (``c_out * k * k * c_in`` without its bias; plus ``2 c_out`` with
BatchNorm), each conv block's 2x2 pooling halves height and width (rounding down), and the head
feeds the dense layers ``H W C`` features (flatten) or ``C`` (global average pooling, gap). Training
keeps about :data:`TRAINING_COPIES` arrays of that size (parameters, gradients, the weight-decay
buffer, up to two optimizer moments, one scratch buffer) for its steps, and
:data:`CHECKPOINT_COPIES` more while a checkpoint is saved (copies of the parameters and the two
moments) or loaded on ``--resume`` (those read from the file, and the model and optimizer being
restored next to the ones built first); inference about :data:`INFERENCE_COPIES` (parameters and
gradients). A configuration whose arrays exceed the memory the system reports as
available (``MemAvailable`` of ``/proc/meminfo``, else the physical memory, and never more than the
address space ``RLIMIT_AS`` (``ulimit -v``) leaves this process) is a one-line error naming the
size, instead of a ``MemoryError`` or an exhausted machine later. Batches are checked the same way.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from streamnn.errors import StreamnnError

TRAINING_COPIES = 6
CHECKPOINT_COPIES = 6
INFERENCE_COPIES = 2


def dense_parameter_count(sizes: Sequence[int]) -> int:
    """Parameters of a stack of dense layers ``sizes = [D, h1, ..., K]`` (weights and biases)."""
    return sum(n_out * (n_in + 1) for n_in, n_out in zip(sizes, sizes[1:]))


def _positive_ints(value: Any, what: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise StreamnnError(f"{what} must be a list of positive integers, got {str(value)[:80]}")
    return list(value)


def conv_parameter_count(image_shape: Sequence[int], conv: Sequence[int], hidden: Sequence[int], n_classes: int,
                         kernel: int, batch_norm: bool, conv_bias: bool = True, head: str = "flatten") -> int:
    """Parameters of a ConvNet (conv blocks with 2x2 pooling, the head, then dense layers)."""
    h, w, c = image_shape
    total = 0
    for filters in conv:
        total += filters * (kernel * kernel * c + int(conv_bias)) + (2 * filters if batch_norm else 0)
        h, w, c = h // 2, w // 2, filters
    features = c if head == "gap" else h * w * c
    return total + dense_parameter_count([features, *hidden, 1 if n_classes == 2 else n_classes])


def parameter_count(model_config: Mapping[str, Any]) -> int | None:
    """Parameters the model of ``model_config`` (:meth:`config` of a model) holds; None if unknown."""
    kind = model_config.get("type")
    if kind == "DeepNetwork":
        return dense_parameter_count(_positive_ints(model_config.get("neuron_cnt"), "neuron_cnt"))
    if kind == "LogisticRegression":
        return dense_parameter_count([*_positive_ints([model_config.get("n_features")], "n_features"), 1])
    if kind == "ConvNet":
        shape = _positive_ints(model_config.get("image_shape"), "image_shape")
        if len(shape) != 3:
            raise StreamnnError(f"image_shape must be (H, W, C), got {shape}")
        hidden = model_config.get("hidden") or []
        return conv_parameter_count(shape, _positive_ints(model_config.get("conv"), "conv"),
                                    _positive_ints(hidden, "hidden") if hidden else [],
                                    _positive_ints([model_config.get("n_classes")], "n_classes")[0],
                                    _positive_ints([model_config.get("kernel", 3)], "kernel")[0],
                                    bool(model_config.get("batch_norm")),
                                    model_config.get("conv_bias", True) is not False,
                                    str(model_config.get("head", "flatten")))
    return None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (None when the system does not say): the
    system's available memory, at most what the address-space limit leaves this process."""
    system = _system_memory()
    room = _address_space_left()
    if room is None:
        return system
    return room if system is None else min(system, room)


def _address_space_left() -> int | None:
    """Bytes RLIMIT_AS (``ulimit -v``) leaves this process beyond its current virtual size (None: no limit)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError, AttributeError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        used = 0
    return max(soft - used, 0)


def _system_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(n_params: int, itemsize: int, copies: int, what: str, unit: str = "parameters") -> None:
    """Raise StreamnnError when ``copies`` arrays of ``n_params`` items cannot fit in memory."""
    need = n_params * itemsize * copies
    free = available_memory()
    if free is not None and need > free:
        raise StreamnnError(f"{what} has {n_params:,} {unit}: about {need / 1e9:.1f} GB with its "
                            f"buffers, more than the {free / 1e9:.1f} GB of memory available"
                            + (" (ulimit -v)" if free == _address_space_left() else ""))
