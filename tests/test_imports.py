"""The layering of the flatcli package, read from its source with ``ast``.

Every import counts: at module level and inside functions (lazy ones), and
``importlib.import_module("flatcli.x")``. A module that imports by a computed name is taken to
import every module of flatcli it names in a string. Only ``if TYPE_CHECKING:`` blocks, which
never run, are left out. ``from flatcli.x import y`` is an edge to ``flatcli.x.y`` when that is a
module, else to ``flatcli.x``.

The rules:

* no cycle between modules (a package's ``__init__`` importing its own submodules is an
  ordinary edge, so a submodule that imports its package back closes a cycle);
* no cycle between flatcli's subpackages (``flatcli.io``, ``flatcli.train``, ...; a top-level
  module counts as one of its own): each layer imports only the layers below it;
* no module imports a package it lies in (``flatcli`` itself included): Python has run that
  package's ``__init__`` before the module, so the import runs upward;
* only ``flatcli/cli`` imports typer or rich.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import flatcli

ROOT = Path(flatcli.__file__).resolve().parent

PENDING: dict[str, str] = {}
"""Modules whose imports the layering rules leave out for now, with what they still do."""

UI_PACKAGES = ("typer", "rich")
"""Third-party packages only the command-line layer may import."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


@cache
def _imports(module: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(imported names, names used by computed imports)`` of ``module``.

    An imported name is absolute (relative imports resolved); ``from a import b`` gives
    ``"a\\0b"``. The second part holds every string constant ``"flatcli.…"`` of a module that
    calls ``import_module`` (or ``__import__``) with a computed name, else nothing.
    """
    path = _sources()[module]
    is_package = path.name == "__init__.py"
    imports: list[str] = []
    strings: list[str] = []
    dynamic = False

    def visit(node: ast.AST) -> None:
        nonlocal dynamic
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            imports.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            imports.extend(f"{base}\0{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and _called_name(node) in ("import_module", "__import__"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                imports.append(arg.value)
            else:
                dynamic = True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith(f"{ROOT.name}."):  # a module below the root, by name
                strings.append(node.value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return tuple(imports), tuple(strings) if dynamic else ()


def import_graph(pending: dict[str, str] | None = None) -> dict[str, set[str]]:
    """``{module: modules of flatcli it imports}`` for every module of the package except
    those in ``pending`` (default :data:`PENDING`), whose imports are left out."""
    pending = PENDING if pending is None else pending
    sources = _sources()
    graph: dict[str, set[str]] = {}
    for module in sources:
        edges: set[str] = set()
        if module not in pending:
            imports, named = _imports(module)
            for name in (*imports, *named):
                base, _, attr = name.partition("\0")
                target = f"{base}.{attr}" if attr and f"{base}.{attr}" in sources else base
                if target in sources and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def layer_of(module: str) -> str:
    """The subpackage (or top-level module) of flatcli that ``module`` belongs to."""
    return ".".join(module.split(".")[:2])


def layer_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` with each subpackage of flatcli contracted to one node."""
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        layer = layer_of(module)
        out.setdefault(layer, set()).update(t for t in map(layer_of, targets) if t != layer)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _why(graph: dict[str, set[str]], cycle: list[str]) -> str:
    """The module imports behind each step of a cycle between layers."""
    steps = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        edges = [
            f"{m} -> {t}"
            for m, ts in sorted(graph.items())
            for t in sorted(ts)
            if layer_of(m) == a and layer_of(t) == b
        ]
        steps.append(f"{a} -> {b} ({', '.join(edges)})")
    return "; ".join(steps)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycles_between_layers():
    graph = import_graph()
    cycle = find_cycle(layer_graph(graph))
    assert cycle is None, "import cycle between layers: " + _why(graph, cycle or [])


def test_no_module_imports_a_package_it_lies_in():
    upward = [
        f"{module} imports {target}"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if module.startswith(target + ".")
    ]
    assert not upward, "upward imports: " + "; ".join(upward)


def test_only_the_cli_imports_typer_or_rich():
    offenders = []
    for module in _sources():
        if layer_of(module) == "flatcli.cli":
            continue
        for name in _imports(module)[0]:
            top = name.partition("\0")[0].split(".")[0]
            if top in UI_PACKAGES:
                offenders.append(f"{module} imports {top}")
    assert not offenders, "; ".join(offenders)


def test_pending_modules_are_still_pending():
    # an entry is dropped once its module is gone or keeps the rules
    assert set(PENDING) <= set(_sources())
    for module in PENDING:
        others = {m: r for m, r in PENDING.items() if m != module}
        graph = import_graph(others)
        upward = any(module.startswith(t + ".") for t in graph[module])
        cyclic = find_cycle(graph) is not None or find_cycle(layer_graph(graph)) is not None
        assert upward or cyclic, f"{module} keeps the rules now: drop it from PENDING"


def test_the_graph_sees_lazy_imports_and_cycles():
    # the rules are only as good as the graph: a function-level import is an edge, a
    # TYPE_CHECKING one is not, a computed import_module reaches the modules it names, and a
    # cycle is reported as its path
    graph = import_graph()
    assert "flatcli.train.prepare" in graph["flatcli.io.load"]  # imported inside load()
    assert "flatcli.io.load" not in graph["flatcli.measures.registry"]  # TYPE_CHECKING only
    assert "flatcli.io.load" in graph["flatcli"]  # the lazy attributes of the package root
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_graph({"flatcli.io.x": {"flatcli.io.y", "flatcli.train.z"}}) == {
        "flatcli.io": {"flatcli.train"}
    }


HEAVY_PACKAGES = ("torch", "numpy", "scipy")
"""What a command's ``--help`` must not import: the option dataclasses (:mod:`flatcli.configs`)
are read without them."""


@cache
def _module_level_imports(module: str) -> tuple[str, ...]:
    """The modules ``module`` imports when it is imported: the packages it lies in and its
    module-level imports (under ``if``/``try`` too; not ``if TYPE_CHECKING:``, not in functions)."""
    sources = _sources()
    parts = module.split(".")
    found = [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages it lies in

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If):
                if not _is_type_checking(node):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, *(h.body for h in node.handlers), node.orelse):
                    visit(block)
            elif isinstance(node, ast.Import):
                found.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                base = node.module or ""
                found.append(base)
                found.extend(
                    f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in sources
                )

    visit(ast.parse(sources[module].read_text()).body)
    return tuple(found)


def test_the_configs_import_no_torch():
    # `flatcli COMMAND --help` reads flatcli.configs alone: at module level neither they nor
    # anything they import (transitively) may import torch, numpy or scipy
    sources = _sources()
    offenders = []
    for start in (m for m in sources if layer_of(m) == "flatcli.configs"):
        path, seen = {start: [start]}, {start}
        todo = [start]
        while todo:
            module = todo.pop()
            for name in _module_level_imports(module):
                if name.split(".")[0] in HEAVY_PACKAGES:
                    offenders.append(" -> ".join([*path[module], name]))
                elif name in sources and name not in seen:
                    seen.add(name)
                    path[name] = [*path[module], name]
                    todo.append(name)
    assert not offenders, "; ".join(sorted(set(offenders)))
    # the walk sees what runs at import, and only that
    assert "torch" in _module_level_imports("flatcli.dtypes")
    assert "flatcli.dtypes" not in _module_level_imports("flatcli.configs._checks")  # lazy
