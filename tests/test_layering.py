"""Imports flow one way: model <- parallel <- train (data beside model, launch beside train), with no import cycle
between modules, lazy imports included. A change that imports upwards fails here with the offending import."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "parallel", "data", "train", "launch", "tools")
# What each package may import from the others (tools/ is at the top: it may use everything).
ALLOWED = {
    "model": set(),
    "data": {"model"},
    "parallel": {"model", "data"},
    "launch": {"model", "parallel", "train.config", "train.config_load", "data.config"},
    "train": {"model", "parallel", "data", "launch.config"},
}


def module_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file, so lazy imports count)."""
    imports: dict[str, set[str]] = defaultdict(set)
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    # `from model import balance` imports the module model.balance, not only model/__init__.py.
                    names += [_submodule(node.module, a.name) for a in node.names]
                imports[module].update(n for n in names if n.split(".")[0] in PACKAGES)
    return imports


def _submodule(package: str, name: str) -> str:
    candidate = ROOT.joinpath(*package.split("."), name)
    return f"{package}.{name}" if candidate.with_suffix(".py").is_file() or candidate.is_dir() else package


def allowed(importer: str, imported: str) -> bool:
    package = importer.split(".")[0]
    if package == "tools" or imported.split(".")[0] == package:
        return True
    return any(imported == rule or imported.startswith(rule + ".") for rule in ALLOWED[package])


def test_no_package_imports_upwards():
    bad = sorted((a, b) for a, bs in module_imports().items() for b in bs if not allowed(a, b))
    assert not bad, f"upward imports (importer, imported): {bad}"


def test_no_import_cycles_between_modules():
    imports = module_imports()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for other in sorted(imports.get(module, ())):
            if other not in imports:  # a name imported from a package's __init__ or a module attribute
                continue
            if state.get(other) == 1:
                cycles.append([*path[path.index(other) :], other])
            elif other not in state:
                visit(other, path)
        path.pop()
        state[module] = 2

    for module in sorted(imports):
        if module not in state:
            visit(module, [])
    assert not cycles, f"import cycles: {cycles}"
