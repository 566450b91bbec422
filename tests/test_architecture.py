"""The shape of the package (issue "one op layer"): small modules, no import cycles, and no
module reaching into another's private names. Read from the source with ``ast``."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "python" / "kdfast"
MAX_LINES = 500


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


MODULES = dict(_modules())
MODULES["kdfast._kdfast"] = None  # the Rust extension


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: pathlib.Path):
    """``(target module, imported name or None)`` of every module-level import."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, is_package, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                yield (sub, None) if sub in MODULES else (target, a.name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small(name):
    if MODULES[name] is None:
        pytest.skip("the compiled extension")
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES})"


def test_no_module_imports_another_modules_private_names():
    bad = [f"{name}: from {target} import {item}"
           for name, path in MODULES.items() if path is not None
           for target, item in _imports(name, path)
           if item is not None and item.startswith("_") and not item.startswith("__") and target in MODULES
           and target != name]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_import_graph_has_no_cycle():
    graph = {name: {t for t, _ in _imports(name, path) if t in MODULES and t != name} if path else set()
             for name, path in MODULES.items()}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n)
