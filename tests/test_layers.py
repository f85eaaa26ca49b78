"""The package's stages import in one direction only (README, Layout):

    errors, faults, console  <-  io  <-  config  <-  models  <-  training, scoring  <-  cli
                                 io  <-  monitoring  <-  training, scoring

Every import counts, at the top of a module or inside a function (a deferred import still
ties the two modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "pneumo_ray"

# What each stage (a folder, or a module at the top level) may import besides itself.
BASE = {"errors", "faults", "console"}
ALLOWED = {
    "errors": set(),
    "faults": set(),
    "console": set(),
    "io": {"errors", "faults"},
    "config": {"io", "errors"},
    "runtime": {"io", "errors", "faults", "console"},
    "models": {"io", "config", "errors"},
    "monitoring": {"io"},
    "training": {"io", "models", "monitoring", "config", "runtime", *BASE},
    "scoring": {"io", "models", "monitoring", "config", "runtime", *BASE},
    "cli": {"io", "models", "monitoring", "training", "scoring", "config", "runtime", *BASE},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The pneumo_ray modules a file imports (``from pneumo_ray.io import stores`` counts as
    pneumo_ray.io.stores when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return {name for name in found if name.startswith("pneumo_ray.") and name in MODULES}


MODULES = {module_name(path) for path in PACKAGE.rglob("*.py")}
GRAPH = {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def stage(module: str) -> str:
    return module.split(".")[1]


def test_every_module_has_a_stage():
    assert {stage(module) for module in MODULES if module != "pneumo_ray"} <= set(ALLOWED)


def wrong_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if module != "pneumo_ray"
        and stage(target) != stage(module)
        and stage(target) not in ALLOWED[stage(module)]
    )


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Depth-first search over the module graph; each back edge closes a cycle."""
    state: dict[str, str] = {}
    found = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_imports_run_down_the_stages_only():
    assert "pneumo_ray.models.predict" in GRAPH["pneumo_ray.training.pipeline"]  # graph is read
    wrong = wrong_imports(GRAPH)
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    found = cycles(GRAPH)
    assert not found, "\n".join(found)


def test_the_checks_see_a_wrong_import_and_a_cycle():
    graph = {
        "pneumo_ray.io.data": {"pneumo_ray.scoring.ledger"},
        "pneumo_ray.models.bundle": {"pneumo_ray.models.predict"},
        "pneumo_ray.models.predict": {"pneumo_ray.models.bundle"},
        "pneumo_ray.scoring.ledger": {"pneumo_ray.io.stores"},
    }
    assert wrong_imports(graph) == ["pneumo_ray.io.data imports pneumo_ray.scoring.ledger"]
    assert cycles(graph) == [
        "pneumo_ray.models.bundle -> pneumo_ray.models.predict -> pneumo_ray.models.bundle"
    ]
