"""Checks of an open store file's members against the format (docs/format.md, "Validation").

A :class:`Checker` reads one attribute, group or dataset of an open HDF5 file with the type it
must have; every failure is one line naming the file. :class:`streamnn.data.store.Store` checks
a store with it on open.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from streamnn.data.format import as_text
from streamnn.errors import StreamnnError
from streamnn.paths import path_text


def valid_text(value: Any) -> bool:
    """False for a str holding bytes that were not UTF-8 (h5py hands them over as surrogates)."""
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_int(value: Any) -> bool:
    """An integer (NumPy's included), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def shown(value: Any) -> str:
    """A short description of a bad value for an error message."""
    if isinstance(value, np.ndarray):
        return f"an array {value.dtype} {value.shape}"
    return f"{type(value).__name__} {str(value)[:40]!r}"


class Checker:
    """Validation of one open store file against the format; every failure names the file."""

    def __init__(self, f: h5py.File, path: Path) -> None:
        self.f, self.path = f, path

    def fail(self, message: str) -> StreamnnError:
        return StreamnnError(message, path_text(self.path))

    def attr(self, name: str, required: bool = True) -> Any:
        if name not in self.f.attrs:
            if required:
                raise self.fail(f"store attribute {name!r} is missing")
            return None
        value = self.f.attrs[name]
        if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
            value = np.array([as_text(v) for v in value.ravel()], dtype=object).reshape(value.shape)
        value = as_text(value)
        texts = value.ravel() if isinstance(value, np.ndarray) and value.dtype == object else [value]
        if not all(valid_text(t) for t in texts):
            raise self.fail(f"store attribute {name!r} is not valid UTF-8 text (damaged?)")
        return value

    def text(self, name: str, required: bool = True, choices: Sequence[str] | None = None) -> str | None:
        value = self.attr(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(f"store attribute {name!r} must be a string, not {shown(value)}")
        if choices is not None and value not in choices:
            raise self.fail(f"store attribute {name!r} is {value!r}, expected one of {', '.join(choices)}")
        return value

    def json_object(self, name: str) -> dict[str, Any]:
        text = self.text(name)
        try:
            value = json.loads(text)  # type: ignore[arg-type]
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise self.fail(f"store attribute {name!r} must be a JSON object")
        return value

    def group(self, name: str, parent: h5py.Group | None = None) -> h5py.Group:
        parent = self.f if parent is None else parent
        item = parent.get(name)
        if not isinstance(item, h5py.Group):
            where = name if parent is self.f else f"{parent.name.lstrip('/')}/{name}"
            raise self.fail(f"member {where!r} must be a group, " + ("it is missing" if item is None else
                                                                      "not a dataset"))
        return item

    def dataset(self, group: h5py.Group, name: str, ndim: int) -> h5py.Dataset:
        item = group.get(name)
        where = f"{group.name.lstrip('/')}/{name}"
        if not isinstance(item, h5py.Dataset):
            raise self.fail(f"member {where!r} must be a dataset, " + ("it is missing" if item is None else
                                                                        "not a group"))
        if item.ndim != ndim:
            raise self.fail(f"dataset {where!r} must have {ndim} dimension(s), it has shape {item.shape}")
        return item

    def strings(self, group: h5py.Group, name: str, n: int | None = None) -> h5py.Dataset:
        d = self.dataset(group, name, 1)
        where = f"{group.name.lstrip('/')}/{name}"
        if h5py.check_string_dtype(d.dtype) is None:
            raise self.fail(f"dataset {where!r} must hold strings, not {d.dtype}")
        if n is not None and d.shape[0] != n:
            raise self.fail(f"dataset {where!r} has {d.shape[0]} entries, expected {n}")
        return d
