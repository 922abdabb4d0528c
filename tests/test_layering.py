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
