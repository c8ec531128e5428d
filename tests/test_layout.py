"""The package's architecture, checked statically (``ast``, nothing imported): the import graph of
``jaxrlhf`` has no cycle, the library layers never import the CLI or the demos, and no function or
module is longer than the style limits. The checkers are small functions, each tested on synthetic
input where it must fail."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "jaxrlhf"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_FUNCTION_LINES = 60  # def line to last line, docstring included (decorators not counted)
MAX_MODULE_LINES = 500

LIBRARY = (
    "rl",
    "models",
    "data",
    "train",
    "collect",
    "tasks",
    "rollout",
    "sampling",
    "tools",
    "best_of",
)
LAYER_RULES = (
    # (importers, forbidden targets, importers allowed anyway)
    (tuple(f"{PACKAGE}.{p}" for p in LIBRARY), (f"{PACKAGE}.cli", f"{PACKAGE}.demo"), ()),
    ((f"{PACKAGE}.demo",), (f"{PACKAGE}.cli",), ()),
    (
        (PACKAGE,),
        (f"{PACKAGE}.cli.main",),
        (f"{PACKAGE}.cli", f"{PACKAGE}.cli.__main__", f"{PACKAGE}.__main__"),
    ),
)


# ----------------------------------------------------------------------------------------------
# Checkers
# ----------------------------------------------------------------------------------------------


def package_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted name → (file, is_package) for every ``*.py`` under ``root`` (``__init__.py`` is the
    package itself)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def within(name: str, prefixes) -> bool:
    """Whether ``name`` is one of ``prefixes`` or a module under one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _nearest_module(name: str, modules) -> str | None:
    """``name`` if it is a module, else its longest dotted prefix that is one."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def imported_modules(source: str, module: str, is_package: bool, modules) -> set[str]:
    """The modules of ``modules`` that ``source`` (the module ``module``) imports, at top level or
    inside functions: ``import a.b`` → ``a.b``; ``from a import b`` → ``a.b`` if that is a module,
    else ``a``; relative imports resolved against ``module``'s package."""
    package = module if is_package else module.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        edges.update(m for t in targets if (m := _nearest_module(t, modules)) is not None)
    edges.discard(module)
    return edges


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module → the package modules it imports (no implicit edge to a parent ``__init__``)."""
    modules = package_modules(root, package)
    return {
        name: imported_modules(path.read_text(encoding="utf-8"), name, is_pkg, modules)
        for name, (path, is_pkg) in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as ``[a, b, …, a]`` (depth-first search), or None if it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def layer_violations(graph: dict[str, set[str]], rules=LAYER_RULES) -> list[str]:
    """``"importer -> target"`` for every edge that a rule ``(importers, forbidden, allowed)``
    forbids: an importer within ``importers`` (not within ``allowed``) importing a module within
    ``forbidden``, unless the importer is itself within that forbidden subtree."""
    out = []
    for source, targets in sorted(graph.items()):
        for importers, forbidden, allowed in rules:
            if not within(source, importers) or source in allowed:
                continue
            for target in sorted(targets):
                hit = [f for f in forbidden if within(target, (f,)) and not within(source, (f,))]
                if hit:
                    out.append(f"{source} -> {target}")
    return out


def oversized(
    source: str,
    name: str = "<source>",
    *,
    max_function: int = MAX_FUNCTION_LINES,
    max_module: int = MAX_MODULE_LINES,
) -> list[str]:
    """Messages for the module (over ``max_module`` lines) and every function or method, nested
    ones included (over ``max_function`` lines, ``def`` to last line), of ``source``."""
    out = []
    lines = len(source.splitlines())
    if lines > max_module:
        out.append(f"{name}: module of {lines} lines (> {max_module})")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > max_function:
                out.append(f"{name}:{node.lineno} {node.name}: {length} lines (> {max_function})")
    return out


# ----------------------------------------------------------------------------------------------
# The package
# ----------------------------------------------------------------------------------------------


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert f"{PACKAGE}.tasks.arithmetic" in graph and f"{PACKAGE}.rl" in graph
    assert sum(map(len, graph.values())) > len(graph)  # the edges were found
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_layers_do_not_import_cli_or_demo():
    violations = layer_violations(import_graph())
    assert not violations, "forbidden imports:\n  " + "\n  ".join(violations)


def test_functions_and_modules_are_short():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        name = str(path.relative_to(ROOT.parent))
        offenders += oversized(path.read_text(encoding="utf-8"), name)
    assert not offenders, f"{len(offenders)} too long:\n  " + "\n  ".join(offenders)


# ----------------------------------------------------------------------------------------------
# The checkers can fail
# ----------------------------------------------------------------------------------------------


def test_find_cycle_reports_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"x"}}) == ["x", "y", "x"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    dag = {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}  # diamond, no cycle
    assert find_cycle(dag) is None


def test_imported_modules_resolves_relative_local_and_from_imports():
    modules = {"p", "p.a", "p.sub", "p.sub.c", "p.sub.d", "p.cli", "p.cli.main"}
    source = (
        "import os\n"
        "import p.a\n"
        "from p.sub import c, helper\n"  # c is a module, helper a name of p.sub
        "from . import b\n"
        "from .. import cli\n"
        "def f():\n"
        "    from ..cli.main import run\n"  # function-local
        "    from p.a.missing import x\n"  # nearest module: p.a
    )
    got = imported_modules(source, "p.sub.d", False, modules)
    # `from . import b` looks for p.sub.b (absent) and falls back to the package p.sub.
    assert got == {"p.a", "p.sub", "p.sub.c", "p.cli", "p.cli.main"}
    # In a package __init__, `.` is the package itself.
    assert imported_modules("from . import c\n", "p.sub", True, modules) == {"p.sub.c"}
    assert imported_modules("import p.sub.c\nfrom p import sub\n", "p.sub.c", False, modules) == {
        "p.sub"
    }  # the module itself is not an edge
    assert imported_modules("from .a import x\n", "p", True, modules) == {"p.a"}


def test_layer_violations_reports_forbidden_edges():
    rules = (
        (("p.rl", "p.rollout"), ("p.cli", "p.demo"), ()),
        (("p",), ("p.cli.main",), ("p.cli", "p.__main__")),
    )
    graph = {
        "p.rl.losses": {"p.demo.ppo", "p.models"},  # forbidden
        "p.rollout": {"p.cli"},  # forbidden: a module matches as well as a package
        "p.rollouts": {"p.cli"},  # not under p.rollout
        "p.cli": {"p.cli.main"},  # allowed
        "p.__main__": {"p.cli.main"},  # allowed
        "p.cli.train": {"p.cli.main"},  # forbidden
        "p.cli.main": {"p.cli.train"},
    }
    assert layer_violations(graph, rules) == [
        "p.cli.train -> p.cli.main",
        "p.rl.losses -> p.demo.ppo",
        "p.rollout -> p.cli",
    ]
    assert layer_violations({"p.rl": {"p.models"}, "p.cli": {"p.rl"}}, rules) == []


def test_oversized_reports_long_functions_methods_and_modules():
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    ok = f"def fits():\n{body}\n"  # 60 lines
    long = f"class C:\n    def method(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n"
    long += "        return 1\n"  # the method: def + 59 + return = 61 lines
    assert oversized(ok) == []
    assert oversized(long, "m.py") == ["m.py:2 method: 61 lines (> 60)"]
    assert oversized(ok, "m.py", max_module=59) == ["m.py: module of 60 lines (> 59)"]
    nested = "def outer():\n    def inner():\n        pass\n    return inner\n"
    assert oversized(nested, max_function=2) == ["<source>:1 outer: 4 lines (> 2)"]
    assert oversized(nested, max_function=1) == [
        "<source>:1 outer: 4 lines (> 1)",
        "<source>:2 inner: 2 lines (> 1)",
    ]
