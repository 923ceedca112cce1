"""The package's layering, read from its imports: plumbing -> methods -> experiments -> lessons.

* plumbing (presets, data, models, features, train, checkpoints, metrics, plots, widgets, and the
  helpers they share) never imports methods, experiments, lessons or exercises;
* methods never import experiments, lessons or exercises, and one lesson's method may use another's
  (lesson 4's exit loss is lesson 1's kd_loss);
* experiments never imports lessons or exercises;
* nothing imports a notebook-facing layer from below, there are no import cycles, and every import sits
  at the top of its module (none hidden inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdbook_utils"

LAYERS = {"plumbing": 0, "methods": 1, "experiments": 2, "lessons": 3, "exercises": 3, "cli": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2:
        return "plumbing"  # the package's own __init__
    top = parts[1]
    if top in ("methods", "experiments", "lessons", "exercises"):
        return top
    if top in ("cli", "__main__"):
        return "cli"
    return "plumbing"


def package_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported kdbook_utils module, line, at top level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdbook_utils"):
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            target = max(
                (
                    n
                    for n in names
                    if (PACKAGE.parent / n.replace(".", "/")).with_suffix(".py").exists()
                    or (PACKAGE.parent / n.replace(".", "/") / "__init__.py").exists()
                ),
                key=len,
            )
            found.append((target, node.lineno, id(node) in top_level))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kdbook_utils"):
                    found.append((alias.name, node.lineno, id(node) in top_level))
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[module_name(p) for p in FILES])
def test_imports_point_down_the_layers(path: Path) -> None:
    source = module_name(path)
    mine = LAYERS[layer_of(source)]
    upward = [f"line {line}: {target}" for target, line, _ in package_imports(path)
              if LAYERS[layer_of(target)] > mine]  # fmt: skip
    assert not upward, f"{source} ({layer_of(source)}) imports from a higher layer: {upward}"


def test_methods_and_plumbing_never_reach_experiments_lessons_or_exercises() -> None:
    for path in FILES:
        source = module_name(path)
        if layer_of(source) in ("plumbing", "methods"):
            for target, line, _ in package_imports(path):
                assert layer_of(target) not in ("experiments", "lessons", "exercises"), (
                    f"{source}:{line} -> {target}"
                )


def test_every_import_is_at_the_top_of_its_module() -> None:
    hidden = []
    for path in FILES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        hidden.append(f"{module_name(path)}:{inner.lineno} (in {node.name})")
    assert not hidden, "imports inside functions or classes: " + ", ".join(hidden)


def test_there_are_no_import_cycles() -> None:
    graph = {module_name(path): {target for target, _, _ in package_imports(path)} for path in FILES}
    visiting, done, cycles = set(), set(), []

    def visit(node: str, trail: list[str]) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append(" -> ".join(trail[trail.index(node) :] + [node]))
            return
        visiting.add(node)
        for child in sorted(graph.get(node, ())):
            visit(child, [*trail, node])
        visiting.discard(node)
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, f"import cycles: {cycles}"
