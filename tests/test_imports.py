"""The package's import graph has no cycles: a small AST walk over every module's top-level imports.

Imports inside functions are how a cycle hides (the module imports fine, then a late import runs
half-initialised code); this test reads only what runs at import time, so a new top-level cycle fails here
with the modules that form it. ``if TYPE_CHECKING:`` blocks never run and are skipped. A package's
``__init__`` re-exporting its modules is the package, not a cycle: importing ``lcpass.x`` loads ``lcpass``
first, which is not an edge of ``lcpass.x``.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> source folder, as pyproject's package-dir maps them
PACKAGES = {"lcpass": ROOT / "lcpass", "lcpass.patterns": ROOT / "patterns", "lcpass.codegen": ROOT / "codegen"}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = f.relative_to(folder).with_suffix("").parts
            name = ".".join((pkg, *parts))
            mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = f
    return mods


def _top_level_imports(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" not in test:
                yield from (n for n in node.body + node.orelse if isinstance(n, (ast.Import, ast.ImportFrom)))
        elif isinstance(node, ast.Try):
            yield from (n for n in node.body if isinstance(n, (ast.Import, ast.ImportFrom)))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at import time."""
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in _top_level_imports(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                d = known(t)
                if d is not None and d != name:
                    deps.add(d)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges into a package's ``__init__`` from its own submodules are dropped (Python loads the package
    first anyway); every other edge stays."""
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def test_the_walk_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_is_read():
    graph = import_graph()
    assert "lcpass.patterns.matcher" in graph and "lcpass.lower" in graph
    assert "lcpass.patterns" in graph["lcpass.lower"]  # package-dir modules are resolved
    assert "lcpass.patterns.op" in graph["lcpass.lower"]


def test_patterns_is_a_leaf():
    """Detection imports nothing of lcpass outside patterns (DESIGN: patterns/ is a leaf)."""
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("lcpass.patterns"):
            outside = sorted(d for d in deps if not d.startswith("lcpass.patterns"))
            assert not outside, f"{mod} imports {outside}"


def test_no_import_cycles():
    found = cycles(_without_package_inits(import_graph()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def _function_imports(tree: ast.Module):
    """Import nodes inside a function or method body (nested functions included); ``if TYPE_CHECKING:``
    blocks never run and are skipped."""
    def walk(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if in_function:
                    yield child
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            else:
                yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    yield from walk(tree, False)


def _imports_lcpass(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        # relative imports only occur inside the package (lcpass.patterns, lcpass.codegen, ...)
        return node.level > 0 or node.module == "lcpass" or (node.module or "").startswith("lcpass.")
    return any(a.name == "lcpass" or a.name.startswith("lcpass.") for a in node.names)


def lazy_imports_without_reason() -> list[str]:
    """``file:line`` of every package import inside a function that does not say why with ``# lazy:``."""
    offenders = []
    for f in _modules().values():
        lines = f.read_text().splitlines()
        for node in _function_imports(ast.parse("\n".join(lines), str(f))):
            text = "\n".join(lines[node.lineno - 1: node.end_lineno])
            if _imports_lcpass(node) and "# lazy:" not in text:
                offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    return offenders


def test_the_function_import_walk():
    tree = ast.parse("from typing import TYPE_CHECKING\nimport lcpass.a\nif TYPE_CHECKING:\n    from lcpass import b\n"
                     "def f():\n    from lcpass import c\n    def g():\n        from .d import e\n    import os\n"
                     "class C:\n    def m(self):\n        import lcpass.f\n")
    found = list(_function_imports(tree))
    assert [n.lineno for n in found] == [6, 8, 9, 12]
    assert [_imports_lcpass(n) for n in found] == [True, True, False, True]


def test_imports_inside_functions_say_why():
    """House rule: no imports inside functions where a top-level import works. An lcpass import that must
    stay inside a function (a real import cycle, an optional dependency, CLI start-up) says so on its line."""
    offenders = lazy_imports_without_reason()
    assert not offenders, ("lcpass imports inside functions without a reason: " + ", ".join(offenders)
                           + " -- move it to the top of the module, or say why it must stay with "
                           "'# lazy: <reason>'")
