"""The package layering, read from the sources' import statements (function-local imports
included): the library is a stack, and the command-line layer sits on top of it.

    errors  <  config_io, outputs  <  model  <  data  <  inference  <  evaluation, training, serving
    <  the command line (flamingo.cli, flamingo.cli_options, every `cli` and `__main__` module)

A module may import its own package and the layers below it, never a layer above it or a
sibling at its level (training reads the benchmarks through flamingo.data.benchmarks, as
evaluation does); no library module imports the command line. So there are no import cycles
between packages, and the library can be used (and tested) without the CLI. Module by module the
import graph has no cycle either, within a package included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYER = {"errors": 0, "config_io": 1, "outputs": 1, "model": 2, "data": 3, "inference": 4, "evaluation": 5,
         "training": 5, "serving": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((SRC / "flamingo").rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The flamingo modules `name` imports anywhere in its source (`from X import Y` counts as X.Y
    when that is a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                         for alias in node.names)
    return {m for m in found if m == "flamingo" or m.startswith("flamingo.")}


def is_command_line(name: str) -> bool:
    last = name.rpartition(".")[2]
    return name in ("flamingo.cli", "flamingo.cli_options") or last in ("cli", "__main__")


def layer_of(name: str) -> tuple[str, int]:
    """(component, layer) of a library module: its first name under flamingo."""
    component = name.split(".")[1]
    return component, LAYER[component]


def test_every_library_component_has_a_layer():
    components = {name.split(".")[1] for name in MODULES if name != "flamingo" and not is_command_line(name)}
    assert components <= set(LAYER), f"give these a layer in LAYER: {sorted(components - set(LAYER))}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m != "flamingo" and not is_command_line(m)))
def test_library_modules_import_only_their_package_and_the_layers_below(name):
    component, layer = layer_of(name)
    bad = []
    for target in sorted(imported_modules(name)):
        if target == "flamingo" or is_command_line(target):
            bad.append(f"{target} (the command line)")
            continue
        other, other_layer = layer_of(target)
        if other != component and other_layer >= layer:
            bad.append(f"{target} ({other}, layer {other_layer} >= {component}'s {layer})")
    assert not bad, f"{name} imports " + "; ".join(bad)


def test_the_package_graph_has_no_cycles():
    """Redundant with the layering while LAYER is a strict order between packages, kept so that a
    future edit of LAYER cannot make two packages depend on each other unnoticed."""
    edges: dict[str, set[str]] = {}
    for name in MODULES:
        if name == "flamingo" or is_command_line(name):
            continue
        component = name.split(".")[1]
        for target in imported_modules(name):
            if target != "flamingo" and not is_command_line(target) and target.split(".")[1] != component:
                edges.setdefault(component, set()).add(target.split(".")[1])

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))

    cyclic = sorted(c for c in edges if reaches(c, c, set()))
    assert not cyclic, f"packages in an import cycle: {cyclic}; edges: { {c: sorted(edges[c]) for c in cyclic} }"


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (module -> the modules it imports) as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_the_module_graph_has_no_cycles():
    """Module by module, function-local imports included: a function-local import hides a cycle
    from Python at import time, not the tie between the two modules (a package-level view cannot
    see cycles inside a package)."""
    graph = {name: {target for target in imported_modules(name) if target != name} for name in MODULES}
    cycle = import_cycle(graph)
    assert cycle is None, "modules in an import cycle: " + " -> ".join(cycle)
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_the_checker_sees_imports():
    """Guards the test itself: known imports of each form are found."""
    assert "flamingo.model.config" in imported_modules("flamingo.model.flamingo")
    assert "flamingo.data.convert" in imported_modules("flamingo.data.shapes")
    assert "flamingo.evaluation.demo" in imported_modules("flamingo.cli")  # a function-local import
    assert is_command_line("flamingo.training.__main__") and not is_command_line("flamingo.training.trainer")
