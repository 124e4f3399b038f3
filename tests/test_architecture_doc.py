"""docs/architecture.md names every module of runtime/ and export/, and no module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
ROW_MODULES = re.compile(r"`([\w/]+\.py)`")


def documented() -> set[str]:
    """Module paths named in the first column of the tables, relative to the repository:
    tables under a heading that names `export/` list export modules, the others runtime's."""
    root, found = "runtime", set()
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            root = "export" if "`export/`" in line else "runtime"
        elif line.startswith("| `"):
            first_column = line.split("|")[1]
            found |= {f"{root}/{name}" for name in ROW_MODULES.findall(first_column)}
    return found


def modules() -> set[str]:
    """Every module a reader may look for; a subpackage's __init__ and __main__ only wire it."""
    found = set()
    for root in ("runtime", "export"):
        for path in (REPO / root).rglob("*.py"):
            nested = path.parent != REPO / root
            if path.name == "__main__.py" or (nested and path.name == "__init__.py"):
                continue
            found.add(path.relative_to(REPO).as_posix())
    return found


def test_architecture_doc_names_every_module():
    missing = sorted(modules() - documented())
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_architecture_doc_names_no_module_that_is_gone():
    stale = sorted(documented() - modules())
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"


def test_architecture_doc_tree_shows_every_subpackage():
    tree = DOC.read_text().split("```")[3]  # the second fenced block: the folder tree
    folders = {path.parent.relative_to(path.parents[1]).as_posix() + "/"
               for root in ("runtime", "export") for path in (REPO / root).glob("*/__init__.py")}
    missing = sorted(f for f in folders if f"  {f}" not in tree)
    assert not missing, f"the tree in docs/architecture.md lacks: {missing}"
