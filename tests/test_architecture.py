"""The package's layering, read from its import statements: no cycles, no upward imports.

Layers, lowest first: the foundation (``errors``, ``dtypes``, ``locations``, ``version``,
``publishing``, ``text``, ``heap``, ``collector``), ``ops`` (pure tensor math), ``checkpoint`` (input I/O), ``storage`` (the format
model and chunk codecs), then ``packing`` and ``reading`` side by side (neither imports the other), the
``api``, and on top the package root and the ``cli``. Every import of a package module is at
module level, where this test sees it: none inside a function or an ``if TYPE_CHECKING`` block.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tallstore"
LAYERS = {
    "errors": 0, "dtypes": 0, "locations": 0, "version": 0, "publishing": 0, "text": 0, "heap": 0,
    "collector": 0,
    "ops": 1, "checkpoint": 2, "storage": 3, "packing": 4, "reading": 4, "api": 5, "__init__": 6, "cli": 6,
}
SIDE_BY_SIDE = {frozenset({"packing", "reading"})}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """Fully qualified package modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "tallstore"]
    if node.level:
        base = importer.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    if prefix.split(".")[0] != "tallstore":
        return []
    known = modules()
    out = []
    for alias in node.names:
        candidate = f"{prefix}.{alias.name}"
        out.append(candidate if candidate in known else prefix)
    return out


def imports(name: str, path: Path) -> tuple[set[str], list[str]]:
    """``(module-level package imports, package imports found anywhere else)`` of one module."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    top: set[str] = set()
    nested: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top.update(resolve(name, is_package, node))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in tree.body:
            nested += resolve(name, is_package, node)
    return top, nested


def layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"{module} belongs to no layer: add it to LAYERS"
    return top, LAYERS[top]


GRAPH = {name: imports(name, path) for name, path in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_a_module_imports_only_its_own_layer_or_lower_ones(module: str) -> None:
    top, rank = layer(module)
    for target in GRAPH[module][0]:
        t_top, t_rank = layer(target)
        assert t_rank <= rank, f"{module} (layer {top}) imports {target} (layer {t_top}, higher)"
        if t_top != top:
            assert frozenset({top, t_top}) not in SIDE_BY_SIDE, f"{module} imports {target}: {top} and {t_top} stay apart"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_package_imports_are_never_hidden_inside_functions_or_type_checking_blocks(module: str) -> None:
    assert not GRAPH[module][1], f"{module} imports {GRAPH[module][1]} below module level"


def test_the_package_has_no_import_cycle() -> None:
    edges = {m: {t for t in deps if t != m and t in GRAPH} for m, (deps, _) in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_no_reader_module_reaches_back_into_the_public_facade() -> None:
    for module, (deps, _) in GRAPH.items():
        if module.startswith("tallstore.reading.") and module != "tallstore.reading.archive":
            assert "tallstore.reading.archive" not in deps, f"{module} imports the façade"
