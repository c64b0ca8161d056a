"""Lazy public names of a package (PEP 562): importing the package costs nothing until a name is used.

The package's ``__init__`` lists ``_EXPORTS = {name: submodule}`` and sets
``__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)``; tests/test_layout.py reads
``_EXPORTS`` as imports of the package.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, importing ``package.<exports[name]>`` on first use."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
