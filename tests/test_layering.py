"""The package's layering, read from the source: the core stages (slimming, export, engines, runtime, model
families) import no benchmark, proxy or command-line code, and no two modules import each other, directly or around a loop (imports inside functions count: a
lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "slimdiff"
# Layers above the core: benchmarks, the trained proxy's own code, and the command lines.
UPPER_LAYERS = ("slimdiff.bench", "slimdiff.proxy", "slimdiff.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The slimdiff modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


# The measuring layer (image quality against the dense model) may use the benchmarks' MAC counts and the proxy's
# adherence analyzer; every other module is a core stage or a library the stages share.
MEASURE_LAYERS = ("slimdiff.quality",)


def _is_core(name: str) -> bool:
    command_line = name.endswith((".cli", ".__main__"))
    return not (name.startswith(UPPER_LAYERS + MEASURE_LAYERS) or command_line)


def test_the_graph_was_read():
    assert "slimdiff.calibrate" in GRAPH and "slimdiff.errors" in GRAPH["slimdiff.calibrate"]
    assert "slimdiff.bench.cli" in GRAPH["slimdiff.cli.commands"]


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if _is_core(n)))
def test_core_stages_import_no_upper_layer(name):
    upper = sorted(m for m in GRAPH[name] if m.startswith(UPPER_LAYERS))
    assert not upper, f"{name} imports {upper}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    # A package's __init__ that hands on names from its own modules is a face, not a dependency loop: its
    # edges into its own package are left out.
    graph = {name: {m for m in deps if not (MODULES[name].name == "__init__.py" and m.startswith(name + "."))}
             for name, deps in GRAPH.items()}
    assert _cycles(graph) == []


def test_no_cycles_between_packages():
    # One level up: slimdiff.export, slimdiff.engines, slimdiff.runtime, ... (and each top-level module) as
    # units. Export makes graphs, engines are built from them, the runtime runs engines: nothing points back.
    def unit(name: str) -> str:
        return ".".join(name.split(".")[:2])

    graph: dict[str, set[str]] = {unit(name): set() for name in GRAPH}
    for name, deps in GRAPH.items():
        graph[unit(name)].update(unit(m) for m in deps if unit(m) != unit(name))
    assert _cycles(graph) == []
