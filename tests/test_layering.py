"""The layering: data flows one way. The AL library (al/) stands under the service core (service/),
and the API (app/) and the worker (worker/) both stand on the core and never import each other.

Read from the source with `ast`, so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("al", "app", "worker", "service")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for each import of one of PACKAGES in a file."""
    tree = ast.parse(path.read_text(), str(path))
    in_functions = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for inner in ast.walk(node)}
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
            # `from al import bench` imports the module al.bench; `from al.data import load` imports al.data
            names = [f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base for alias in node.names]
        else:
            continue
        for name in dict.fromkeys(names):
            if name.split(".")[0] in PACKAGES:
                found.append((name, node.lineno, id(node) not in in_functions))
    return found


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, list[tuple[str, int, bool]]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            graph[module_name(path)] = first_party_imports(path)
    return graph


GRAPH = import_graph()


def imports_of(package: str, *, module_level_only: bool = False) -> list[str]:
    """'importer:line -> imported' for every import that a module of `package` makes of another package."""
    return [
        f"{module}:{line} -> {name}"
        for module, edges in GRAPH.items() if module.split(".")[0] == package
        for name, line, top in edges
        if name.split(".")[0] != package and (top or not module_level_only)
    ]


def test_every_package_is_read():
    assert all(any(m.split(".")[0] == p for m in GRAPH) for p in PACKAGES), sorted(GRAPH)


@pytest.mark.parametrize("importer, forbidden", [("app", "worker"), ("worker", "app"), ("service", "app"),
                                                 ("service", "worker")])
def test_the_api_and_the_worker_stand_on_the_core_and_never_import_each_other(importer, forbidden):
    wrong = [line for line in imports_of(importer) if line.split(" -> ")[1].split(".")[0] == forbidden]
    assert not wrong, f"{importer} must not import {forbidden}: {wrong}"


def test_the_al_library_imports_no_service_at_module_level():
    wrong = imports_of("al", module_level_only=True)
    assert not wrong, f"al imports the service at module level: {wrong}"


def test_no_import_cycles():
    """Module-level and lazy imports alike: a cycle hidden inside a function is still a cycle."""
    edges = {m: {name for name, _, _ in imports if name in GRAPH and name != m} for m, imports in GRAPH.items()}
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


def test_al_train_loads_no_service_code():
    """`al train` builds the whole command line, service subcommands included, without importing them."""
    code = ("import sys, al.cli; al.cli.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'app', 'worker', 'service', 'fastapi', 'celery'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
