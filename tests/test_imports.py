"""No import cycles inside prefalign (issue #14).

Every module under ``src/prefalign`` is parsed with :mod:`ast` (nothing is imported)
and an edge ``a → b`` is drawn for each ``import prefalign.b`` / ``from . import b`` /
``from .b import x`` in ``a``. Lazy imports inside functions count too: a cycle that
only closes at call time still means two modules that cannot be understood, tested or
moved apart, which is what the rule is for. Imports under ``if TYPE_CHECKING:`` never
run, but a cycle through them still shows two modules that know each other (issue #23):
:func:`test_no_import_cycles_type_checking_included` forbids those too, but for the
ones listed in :data:`TYPE_CHECKING_CYCLES`.

``from .pkg import name`` where ``pkg/name.py`` exists is an edge to ``pkg.name``
(the submodule); otherwise an edge to ``pkg`` (its ``__init__``). A package's
``__init__`` importing its own submodules is an edge like any other, but a
submodule's implicit import of its parent package (Python runs ``pkg/__init__``
first) is not drawn, since every submodule has it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "prefalign"
PACKAGE = "prefalign"


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


#: Cycles that close only through ``if TYPE_CHECKING:`` imports and are left for a
#: follow-up, as sorted tuples of their modules, each with the reason.
TYPE_CHECKING_CYCLES: dict[tuple[str, ...], str] = {
    # Engine.session builds a Session that then drives the engine: the inversion the
    # engine's own change (issue #23, the `engine` helper) removes; not this module's.
    ("prefalign.engine", "prefalign.streaming"): "engine↔streaming: Session/Engine direction, engine follow-up",
}


def _imports(tree: ast.AST, type_checking: bool = False) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not type_checking:
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append(child)
            visit(child)

    visit(tree)
    return out


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """``{module: {prefalign modules it imports}}`` over every module of the package
    (``type_checking``: with the imports under ``if TYPE_CHECKING:``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}

    def resolve(target: str) -> str | None:
        while target and target not in modules:  # prefalign.x.y.attr → prefalign.x.y
            target = target.rpartition(".")[0]
        return target or None

    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), type_checking):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
            else:
                if node.level:
                    base = package.split(".")
                    if node.level > 1:
                        base = base[: len(base) - (node.level - 1)]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == PACKAGE:
                    base_name = node.module
                else:
                    continue
                for alias in node.names:
                    sub = f"{base_name}.{alias.name}"
                    targets.append(sub if sub in modules else base_name)
            for target in targets:
                resolved = resolve(target)
                if resolved and resolved != name:
                    graph[name].add(resolved)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component  # pragma: no cover - a component always has a cycle


def test_the_checker_sees_edges_and_cycles() -> None:
    graph = import_graph()
    assert "prefalign.cli_options" in graph["prefalign.cli"]
    assert "prefalign.prm.train" in graph["prefalign.prm.cli"]  # a lazy, function-level import
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (module-level and lazy imports both count):\n" + "\n".join(
        "  " + " → ".join(c) for c in cycles
    )


def test_the_checker_sees_type_checking_imports() -> None:
    assert "prefalign.engine" in import_graph(type_checking=True)["prefalign.streaming"]
    assert "prefalign.engine" not in import_graph()["prefalign.streaming"]


def test_no_import_cycles_type_checking_included() -> None:
    cycles = find_cycles(import_graph(type_checking=True))
    found = {tuple(sorted(set(c))) for c in cycles}
    unexpected = [c for c in cycles if tuple(sorted(set(c))) not in TYPE_CHECKING_CYCLES]
    assert not unexpected, "import cycles through TYPE_CHECKING imports (annotations can import a lower module):\n" + "\n".join(
        "  " + " → ".join(c) for c in unexpected
    )
    gone = set(TYPE_CHECKING_CYCLES) - found
    assert not gone, f"allowed cycles that are gone (remove them from TYPE_CHECKING_CYCLES): {sorted(gone)}"
