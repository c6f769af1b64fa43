"""The package's arrangement: one-way imports, no hidden imports, no branches on scheme names outside the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from roformer.positional import SCHEMES

PKG = Path(__file__).resolve().parents[1] / "roformer"
MODULES = {
    ".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
    for p in sorted(PKG.rglob("*.py"))
}
# imported inside functions on purpose: optional, or heavy and needed only on some paths
LAZY_OK = {"wandb", "matplotlib", "matplotlib.pyplot", "datasets", "pyarrow.compute", "transformers"}


def _imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """(module imported, node) for every import under ``tree``. ``from pkg import sub`` of a submodule counts
    as importing the submodule (the package's ``__init__`` only names it)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, "relative imports: use absolute ones, as the rest of the package does"
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            if len(subs) < len(node.names):
                out.append((node.module, node))
            out += [(m, node) for m in subs]
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for mod, path in MODULES.items():
        deps = {name for name, _ in _imports(ast.parse(path.read_text())) if name in MODULES and name != mod}
        graph[mod] = deps
    return graph


def test_no_import_cycles():
    graph, state, stack = _graph(), {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)


def test_config_is_imported_only_by_the_entry_points():
    importers = [m for m, deps in _graph().items() if "roformer.config" in deps]
    assert importers == [], f"{importers} import roformer.config (Hydra's face); import the schema's own module"


def test_no_imports_inside_functions_except_optional_heavy_ones():
    found = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for name, node in _imports(fn):
                if name not in LAZY_OK and name.split(".")[0] not in LAZY_OK:
                    found.append(f"{path.relative_to(PKG.parent)}:{node.lineno} imports {name} inside {fn.name}()")
    assert found == []


def test_modules_and_functions_stay_readable():
    # the positional package's modules (the registry and base, one per family) are kept shorter still
    cap = {m: 450 if m.startswith("roformer.positional") else 550 for m in MODULES}
    long_modules = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > cap[m]}
    assert long_modules == {}
    long_functions = []
    for mod, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and fn.end_lineno - fn.lineno + 1 > 80:
                long_functions.append(f"{mod}.{fn.name}: {fn.end_lineno - fn.lineno + 1} lines")
    assert long_functions == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_branch_on_a_scheme_name_outside_the_registry(module):
    """``if pos.name == "learned"`` belongs in a hook of the scheme (roformer/positional/), not in the code that uses
    it; the schemes themselves answer through their class, so no module needs one."""
    tree = ast.parse(MODULES[module].read_text())
    names = set(SCHEMES)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            for c in consts:
                values = c if isinstance(c, tuple) else (c,)
                if any(v in names for v in values if isinstance(v, str)):
                    bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert bad == []


def test_the_schemes_import_the_base_module_not_their_package():
    """roformer/positional/__init__.py imports every module of the package (each registers its schemes): one that
    imported the package back would find it half-initialised."""
    bad = [m for m, deps in _graph().items() if m.startswith("roformer.positional.") and "roformer.positional" in deps]
    assert bad == []
