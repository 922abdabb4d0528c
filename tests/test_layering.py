"""The packages depend in one direction: atomic_files at the bottom, pkm and data_prep on it,
pretrain and finetune on them, experiments (the demo and the ablation) on top. Read from the source (every import, also the
ones inside functions), so a lazy import cannot hide a tangle."""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("atomic_files", "pkm", "data_prep", "pretrain", "finetune", "experiments")
MAY_IMPORT = {
    "atomic_files": set(),
    "pkm": {"atomic_files"},
    "data_prep": {"atomic_files"},
    "pretrain": {"atomic_files", "pkm", "data_prep"},
    "finetune": {"atomic_files", "pkm"},
    "experiments": {"atomic_files", "pkm", "data_prep", "pretrain", "finetune"},
}


def imported_packages(package: str) -> dict[str, set[str]]:
    """{project package: the files of ``package`` that import it}."""
    found: dict[str, set[str]] = {}
    folder = os.path.join(REPO, package)
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names} & set(PACKAGES) - {package}:
                    found.setdefault(top, set()).add(os.path.relpath(path, REPO))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_one_way(package):
    wrong = {dep: files for dep, files in imported_packages(package).items() if dep not in MAY_IMPORT[package]}
    assert not wrong, f"{package} imports {wrong}"


def module_imports(package: str) -> dict[str, set[str]]:
    """{module of ``package``: the modules of ``package`` it imports} (every import, also the ones
    inside functions; ``from pkg import name`` counts as importing ``pkg.name`` when that is a module)."""
    folder = os.path.join(REPO, package)
    modules = {package if name == "__init__.py" else f"{package}.{name[:-3]}"
               for name in os.listdir(folder) if name.endswith(".py")}
    graph: dict[str, set[str]] = {}
    for module in modules:
        name = "__init__.py" if module == package else module.split(".")[-1] + ".py"
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            tree = ast.parse(f.read(), name)
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules
                found |= subs or {node.module}
        graph[module] = found - {module}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_pkm_modules_import_without_a_circle():
    """E.g. configuration -> hf_auto -> modeling -> configuration was one: the config module must not
    know the model code. The package's __init__ (the facade every submodule import runs) is left out."""
    graph = {m: deps - {"pkm"} for m, deps in module_imports("pkm").items() if m != "pkm"}
    assert graph["pkm.configuration"] == {"pkm.memory_config"}
    assert import_cycle(graph) is None, " -> ".join(import_cycle(graph))
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail
