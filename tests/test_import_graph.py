"""The import graph the architecture promises: no cycles between modules, and the model core
imports no front end (the CLI, the HTTP service, watch, the archive, alerts, Ray)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "edgecap", "export": "edgecap.export"}
# The model core (docs/architecture.md): everything else in runtime/ is a front end or a
# concern of the camera side, and may import the core, never the other way round.
CORE = {"captioner", "decoding", "grounding", "manifest", "options", "results", "preprocess",
        "tokenizer", "step", "sessions", "errors", "device_runner", "gather_graph",
        "gpu_providers", "arg_types"}


def imports(path: Path, package: str, modules: set[str]) -> set[str]:
    """Sibling modules ``path`` imports anywhere (functions included), except under
    ``if TYPE_CHECKING:``, which never runs."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and getattr(block.test, "id", None) == "TYPE_CHECKING"
               for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
        elif node.level == 0 and (node.module or "").startswith(package + "."):
            names = [node.module[len(package) + 1:]]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in modules)
    return found - {path.stem}


def graph(folder: str) -> dict[str, set[str]]:
    paths = {p.stem: p for p in (REPO / folder).glob("*.py") if p.stem != "__init__"}
    return {name: imports(path, PACKAGES[folder], set(paths)) for name, path in paths.items()}


def cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_no_import_cycles(folder):
    modules = graph(folder)
    cycles = [c for name in sorted(modules) if (c := cycle_from(modules, name))]
    assert not cycles, f"import cycles in {folder}/: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_core_imports_no_front_end():
    modules = graph("runtime")
    assert CORE <= set(modules), CORE - set(modules)
    leaks = {name: modules[name] - CORE for name in CORE if modules[name] - CORE}
    assert not leaks, f"core modules import front ends: {leaks}"
