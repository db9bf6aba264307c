"""No import cycles among depthbench's modules: the module-level imports (those that run when a module is imported;
imports inside functions are deferred and excluded) form a directed acyclic graph. A cycle makes the import order
matter and is the usual sign of two modules that each reach into the other."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from tests.helpers import REPO


def _modules() -> dict[str, Path]:
    """Every installed depthbench module name -> its file, from pyproject's package-dir (as setuptools maps them)."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {"depthbench": REPO / "depthbench", **{pkg: REPO / folder for pkg, folder in tool["package-dir"].items()}}
    modules = {}
    for package in tool["packages"]:
        base = next(root / Path(*package[len(prefix):].strip(".").split(".")) if package != prefix else root
                    for prefix, root in sorted(roots.items(), key=lambda kv: -len(kv[0]))
                    if package == prefix or package.startswith(prefix + "."))
        for path in base.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _module_level_imports(path: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in tree.body:  # top level only (also inside top-level if/try blocks)
        stack = [node]
        while stack:
            item = stack.pop()
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(item, ast.Import):
                found |= {alias.name for alias in item.names}
            elif isinstance(item, ast.ImportFrom):
                base = item.module or ""
                if item.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - item.level + 1] + ([base] if base else []))
                found.add(base)
                found |= {f"{base}.{alias.name}" for alias in item.names}
            elif isinstance(item, (ast.If, ast.Try)):
                stack.extend(ast.iter_child_nodes(item))
    return {m for m in found if m in known and m != name}


def test_depthbench_has_no_module_level_import_cycles():
    modules = _modules()
    assert "depthbench.pruners.methods.uidl" in modules and "depthbench.modeling.surgery" in modules
    graph = {name: _module_level_imports(path, name, set(modules)) for name, path in modules.items()}
    # (a submodule's parent package is imported first, but a package __init__ that imports its own submodules is
    # not a cycle: Python gives the submodule the partly initialised package; only named imports count)
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
