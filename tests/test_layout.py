"""The package's layout rules: stages import only earlier stages, no import cycle, short modules, public names.

Stages, in data-flow order (docs/layout.md): the base modules, ``dist``, ``data``, ``pack``, ``nn``,
``optim``, ``run``, ``cli``. Every import counts, also one inside a function (a lazy import still
ties the modules together), and so do the lazy exports of ``streamnn/__init__.py``.
"""
from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

import streamnn

ROOT = Path(streamnn.__file__).parent
BASE = {"streamnn", "streamnn.errors", "streamnn.paths", "streamnn.atomic", "streamnn.rng", "streamnn.version",
        "streamnn.lazy", "streamnn.h5write", "streamnn.threads"}
#: stage -> the stages it may import from (itself and the base always).
ALLOWED = {
    "base": set(),
    "dist": set(),
    "data": {"dist"},
    "pack": {"dist", "data"},
    "nn": set(),
    "optim": set(),
    "run": {"dist", "data", "pack", "nn", "optim"},
    "cli": {"dist", "data", "pack", "nn", "optim", "run"},
    # framework adapters (the only modules that import torch): a store's batches for PyTorch / Grain
    "torch": {"dist", "data"},
    "grain": {"dist", "data"},
}
MAX_LINES = 420


def module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ["streamnn", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_names()


def stage(module: str) -> str:
    if module in BASE:
        return "base"
    return module.split(".")[1]


def target(name: str) -> str | None:
    """The streamnn module an import of ``name`` runs (the longest known prefix)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


def imports(module: str) -> set[str]:
    """Every streamnn module ``module`` imports, at any depth of its code; a package's lazy exports too."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {t for t in map(target, names) if t and t != module}
    for node in tree.body:  # a package's lazy exports (streamnn.lazy) are imports of it
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_EXPORTS":
            found |= {f"{module}.{ast.literal_eval(v)}" for v in node.value.values}
    # a package's own __init__ is run by any import of its modules: not an edge of its own
    return {t for t in found if not module.startswith(t + ".")}


GRAPH = {m: imports(m) for m in MODULES}


def test_every_lazy_export_is_a_module():
    assert GRAPH["streamnn"] <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_earlier_stages(module):
    mine = stage(module)
    if module == "streamnn":  # the lazy public API names every stage
        return
    wrong = sorted(t for t in GRAPH[module] if stage(t) not in {"base", mine} | ALLOWED[mine])
    assert not wrong, f"{module} ({mine}) imports from later stages: {wrong}"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_checker_sees_cycles_and_late_imports():
    saved = dict(GRAPH)
    try:
        GRAPH["streamnn.errors"] = {"streamnn.paths"}
        GRAPH["streamnn.paths"] = {"streamnn.errors"}
        with pytest.raises(AssertionError, match="import cycle"):
            test_no_import_cycle()
        GRAPH["streamnn.data.order"] = {"streamnn.run.trainer"}
        with pytest.raises(AssertionError, match="later stages"):
            test_imports_only_earlier_stages("streamnn.data.order")
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_short(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines"


def test_public_names():
    for name in streamnn.__all__:
        assert getattr(streamnn, name) is not None, name
    from streamnn import ConvNet, DeepNetwork, Loader, LogisticRegression, open_store  # noqa: F401
    from streamnn.pack import pack
    assert callable(pack)
    for package in ("streamnn.nn", "streamnn.optim"):
        module = importlib.import_module(package)
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{package}.{name}"


def test_console_entry_points_resolve():
    scripts = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"streamnn-pack", "streamnn-info", "streamnn-train", "streamnn-eval", "streamnn-predict"}
    for spec in scripts.values():
        module, _, attr = spec.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
        command = importlib.import_module(f"{module}.{attr.removeprefix('streamnn_')}")
        assert callable(command.main) and callable(getattr(importlib.import_module(module), attr))


def test_checkpoint_type_names_are_kept():
    """Checkpoints store these names; a file written by any release must find its class."""
    from streamnn.nn import LAYERS
    from streamnn.nn.models import MODELS
    assert set(LAYERS) >= {"Activation", "BatchNorm", "Conv2D", "Dense", "Dropout", "Flatten", "GlobalAvgPool2D",
                           "MaxPool2D"}
    assert set(MODELS) >= {"ConvNet", "DeepNetwork", "LogisticRegression"}
