"""The import graph the architecture promises (docs/architecture.md): no cycles between modules
or between subpackages, the model core imports no front end, and each front end or concern
imports only the layers below it."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"runtime": "edgecap", "export": "edgecap.export"}
# What each runtime subpackage may import besides the core (the flat top-level modules, and gpu/
# for NVIDIA machines). `distributed` is the Ray library entry point, a front end kept at the top so that
# `edgecap.distributed.caption_dataset` stays where users import it from.
ALLOWED = {
    "archive": set(),
    # Rules match captions with the archive's search syntax, so they share its FTS tokenizer.
    "alerts": {"archive"},
    "watch": {"alerts", "archive"},
    "serve": {"archive"},
    "distributed": set(),
    "cli": {"serve", "watch", "archive", "alerts", "distributed"},
}
FRONT_ENDS = set(ALLOWED)


def module_files(root: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module under ``root`` (packages as their name)."""
    found = {}
    for path in sorted((REPO / root).rglob("*.py")):
        parts = list(path.relative_to(REPO / root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([ROOTS[root], *parts])] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The known modules ``path`` imports anywhere (functions included), except under
    ``if TYPE_CHECKING:``, which never runs. ``from pkg import mod`` counts as ``pkg.mod``."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and getattr(block.test, "id", None) == "TYPE_CHECKING"
               for node in ast.walk(block)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            if f"{target}.{alias.name}" in known:
                found.add(f"{target}.{alias.name}")
            elif target in known:
                found.add(target)
    return found - {name}


def graph(root: str) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports(path, name, set(files)) for name, path in files.items()}


def cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def cycles(graph: dict[str, set[str]]) -> list[str]:
    return [" -> ".join(c) for name in sorted(graph) if (c := cycle_from(graph, name))]


def layer(module: str) -> str:
    """The runtime layer a module belongs to: its subpackage, or "core" for the flat top and gpu/."""
    parts = module.split(".")
    if len(parts) == 1:
        return "core"
    if parts[1] in ALLOWED or parts[1] == "export":
        return parts[1]
    return "core"


@pytest.mark.parametrize("root", sorted(ROOTS))
def test_no_import_cycles_between_modules(root):
    found = cycles(graph(root))
    assert not found, f"import cycles in {root}/: " + "; ".join(found)


def test_runtime_layers_import_only_downwards():
    modules = graph("runtime")
    wrong = {}
    for name, deps in modules.items():
        own = layer(name)
        allowed = {"core", own} | ALLOWED.get(own, set())
        bad = {dep for dep in deps if layer(dep) not in allowed}
        if bad:
            wrong[name] = sorted(bad)
    assert not wrong, f"imports against the layers of docs/architecture.md: {wrong}"


def test_no_cycles_between_layers():
    modules = graph("runtime")
    layers: dict[str, set[str]] = {}
    for name, deps in modules.items():
        layers.setdefault(layer(name), set()).update(
            layer(d) for d in deps if layer(d) != layer(name))
    found = cycles(layers)
    assert not found, "; ".join(found)


def test_export_subpackages_form_no_cycle():
    folders: dict[str, set[str]] = {}
    for name, deps in graph("export").items():
        parts = name.split(".")
        mine = parts[2] if len(parts) > 3 else "export"
        for dep in deps:
            dparts = dep.split(".")
            theirs = dparts[2] if len(dparts) > 3 else "export"
            if dep.startswith("edgecap.export") and theirs != mine:
                folders.setdefault(mine, set()).add(theirs)
    # The top-level export modules (commands, the shared torch model) may use any group; the
    # groups themselves must not lean on each other in a circle.
    groups = {k: v - {"export"} for k, v in folders.items() if k != "export"}
    found = cycles(groups)
    assert not found, "; ".join(found)


def test_the_core_imports_no_front_end():
    modules = graph("runtime")
    core = {name for name in modules if layer(name) == "core"}
    leaks = {name: sorted(d for d in modules[name] if layer(d) in FRONT_ENDS)
             for name in core}
    leaks = {k: v for k, v in leaks.items() if v}
    assert not leaks, f"core modules import front ends: {leaks}"
    assert {"edgecap.captioner", "edgecap.decoding", "edgecap.runner"} <= core


def test_every_package_folder_is_installed():
    """A folder of modules missing from pyproject's package list would be left out of wheels."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    folders = {name for root in ROOTS for name, path in module_files(root).items()
               if path.name == "__init__.py"}
    assert folders == listed
