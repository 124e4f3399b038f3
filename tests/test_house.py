"""Size limits of runtime/ and export/: no function over MAX_FUNCTION lines and no module over
MAX_MODULE lines, so that a reader finds one idea per function and per file. Each test reports
every offender at once."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("runtime", "export")
MAX_FUNCTION = 60  # lines from `def` to its last line, decorators not counted
MAX_MODULE = 450  # lines in the file

# Known offenders, with the size they have now: they may not grow, and an entry that no longer
# offends fails the test so that it is removed. Keep them empty: split instead.
KNOWN_LONG_MODULES: dict[str, int] = {}  # path -> lines
KNOWN_LONG_FUNCTIONS: dict[str, int] = {}  # "path:function" -> lines


def sources() -> list[Path]:
    return sorted(p for root in ROOTS for p in (REPO / root).rglob("*.py"))


def function_lengths(path: Path) -> dict[str, int]:
    """``path:name`` (``path:Class.name`` for methods, nested ones by their full path) ->
    lines."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                found[f"{path.relative_to(REPO).as_posix()}:{name}"] = (
                    child.end_lineno - child.lineno + 1)
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text()), "")
    return found


def over(sizes: dict[str, int], limit: int, known: dict[str, int]) -> tuple[list[str], list[str]]:
    """(offenders beyond the limit and their known size, known entries that no longer offend)."""
    offenders = [f"{name}: {lines} lines" for name, lines in sorted(sizes.items())
                 if lines > max(limit, known.get(name, 0))]
    settled = [name for name in sorted(known) if sizes.get(name, 0) <= limit]
    return offenders, settled


def test_no_function_is_over_the_limit():
    sizes = {name: lines for path in sources() for name, lines in function_lengths(path).items()}
    offenders, settled = over(sizes, MAX_FUNCTION, KNOWN_LONG_FUNCTIONS)
    assert not offenders, f"functions over {MAX_FUNCTION} lines:\n" + "\n".join(offenders)
    assert not settled, (f"now at most {MAX_FUNCTION} lines; drop from KNOWN_LONG_FUNCTIONS: "
                         f"{settled}")


def test_no_module_is_over_the_limit():
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in sources()}
    offenders, settled = over(sizes, MAX_MODULE, KNOWN_LONG_MODULES)
    assert not offenders, f"modules over {MAX_MODULE} lines:\n" + "\n".join(offenders)
    assert not settled, f"now at most {MAX_MODULE} lines; drop from KNOWN_LONG_MODULES: {settled}"


def test_the_limits_are_measured_as_documented():
    """The scan sees methods and nested functions, and counts a function's lines inclusively."""
    sample = REPO / "runtime" / "archive" / "hits.py"
    lengths = function_lengths(sample)
    assert "runtime/archive/hits.py:Hit.to_dict" in lengths
    assert "runtime/archive/hits.py:events" in lengths
    tree = ast.parse(sample.read_text())
    events = next(n for n in tree.body if getattr(n, "name", "") == "events")
    assert lengths["runtime/archive/hits.py:events"] == events.end_lineno - events.lineno + 1
