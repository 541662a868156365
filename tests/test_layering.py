"""The layering: data flows one way. The AL library (al/) stands under the service core (service/),
and the API (app/) and the worker (worker/) both stand on the core and never import each other. The
benchmarks (benchmarks/) stand on top: nothing imports them. And the size of files and functions.

Read from the source with `ast`, so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("al", "app", "worker", "service", "benchmarks")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for each import of one of PACKAGES in a file, inside functions too."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package upwards
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from al import pipeline` imports the module al.pipeline; `from al.data import load` imports al.data
            names = [f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base for alias in node.names]
        else:
            continue
        for name in dict.fromkeys(names):
            if name.split(".")[0] in PACKAGES:
                found.append((name, node.lineno))
    return found


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, list[tuple[str, int]]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            graph[module_name(path)] = first_party_imports(path)
    return graph


GRAPH = import_graph()


def imports_of(package: str) -> list[str]:
    """'importer:line -> imported' for every import that a module of `package` makes of another package."""
    return [
        f"{module}:{line} -> {name}"
        for module, edges in GRAPH.items() if module.split(".")[0] == package
        for name, line in edges
        if name.split(".")[0] != package
    ]


def test_every_package_is_read():
    assert all(any(m.split(".")[0] == p for m in GRAPH) for p in PACKAGES), sorted(GRAPH)


@pytest.mark.parametrize("importer, forbidden", [("app", "worker"), ("worker", "app"), ("service", "app"),
                                                 ("service", "worker")])
def test_the_api_and_the_worker_stand_on_the_core_and_never_import_each_other(importer, forbidden):
    wrong = [line for line in imports_of(importer) if line.split(" -> ")[1].split(".")[0] == forbidden]
    assert not wrong, f"{importer} must not import {forbidden}: {wrong}"


@pytest.mark.parametrize("importer", ["service", "app", "worker"])
def test_nothing_under_the_benchmarks_imports_them(importer):
    wrong = [line for line in imports_of(importer) if line.split(" -> ")[1].split(".")[0] == "benchmarks"]
    assert not wrong, f"{importer} must not import benchmarks: {wrong}"


def test_the_al_library_imports_nothing_above_it():
    """Not even inside a function: `al serve` and the others reach the `al` command through entry points."""
    wrong = imports_of("al")
    assert not wrong, f"al imports the packages above it: {wrong}"


def test_no_import_cycles():
    """Module-level and lazy imports alike: a cycle hidden inside a function is still a cycle."""
    edges = {m: {name for name, _ in imports if name in GRAPH and name != m} for m, imports in GRAPH.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def loaded_modules(code: str, packages: set[str]) -> list[str]:
    """The modules of `packages` that a fresh interpreter has loaded after running `code`."""
    code += f"; import json, sys; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_al_train_loads_no_service_code():
    """`al train` builds the whole command line, the installed commands included, and loads of the packages
    above the library only the small modules that add those commands."""
    loaded = loaded_modules("import al.cli; al.cli.build_parser()",
                            {"app", "worker", "service", "benchmarks", "fastapi", "uvicorn", "celery", "sqlalchemy"})
    assert loaded == ["app", "app.commands", "benchmarks", "benchmarks.commands", "worker", "worker.commands"]


@pytest.mark.parametrize("module", ["app.commands", "worker.commands", "benchmarks.commands"])
def test_the_modules_that_add_commands_are_cheap_to_import(module):
    """They load with every `al` command; the server, the worker and torch load when their command runs."""
    assert loaded_modules(f"import {module}", {"torch", "fastapi", "uvicorn", "celery", "sqlalchemy", "service"}) == []


def python_files() -> list[Path]:
    """The project's Python files outside tests/ (no virtual environments, caches or build output)."""
    found = []
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".") and d not in ("tests", "build", "dist")
                             and d != "__pycache__" and not d.endswith(".egg-info")]
        found += [Path(directory, f) for f in files if f.endswith(".py")]
    return sorted(found)


def test_no_file_is_too_long():
    lines = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in python_files()}
    long = {path: n for path, n in lines.items() if n > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_too_long():
    long = {}
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
