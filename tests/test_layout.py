"""The package's layout is its architecture: a room imports only rooms below it, and no modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pathwsi

PACKAGE = Path(pathwsi.__file__).parent
# Rooms from the bottom up. Shared types and checks first; the stages in pipeline order; then what reads
# every stage's outputs (the run summary) and the command line.
ORDER = ["shared", "runtime", "stain", "slides", "features", "finetune", "predict", "demo", "summary", "cli"]
SHARED = {
    "pathwsi",
    "pathwsi.errors",
    "pathwsi.config",
    "pathwsi.samples",
    "pathwsi.rerun_params",
    "pathwsi.stats",
}  # version, errors, config, sheet, what of them the rules' params hold, statistics


def room(module: str) -> str:
    """`pathwsi.slides.grid` -> `slides`; the shared top-level modules -> `shared`."""
    return "shared" if module in SHARED else module.split(".")[1]


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The pathwsi modules `path` imports (all of them, or those imported when it is itself imported)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pathwsi"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pathwsi"))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_every_module_is_in_a_known_room():
    assert {room(m) for m in MODULES} <= set(ORDER)


def test_a_room_imports_only_rooms_below_it():
    upward = [
        f"{name} imports {target}"
        for name, path in MODULES.items()
        for target in imports(path)
        if ORDER.index(room(target)) > ORDER.index(room(name))
    ]
    assert upward == []


def test_no_import_cycles():
    graph = {name: {t for t in imports(path, top_level_only=True) if t in MODULES} for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])
