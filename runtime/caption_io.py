"""The caption command's inputs and lines, shared by its local and Ray paths: which files a
list of paths, folders and globs names, which of them an earlier run already wrote to ``--out``,
and how one record is written. The Ray library (``distributed.py``) uses them without importing
the command."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable
from pathlib import Path

from .preprocess import IMAGE_SUFFIXES


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Files as given; folders walked recursively for image suffixes; globs expanded. Sorted
    within each pattern so runs are reproducible; duplicates kept once."""
    seen: dict[str, None] = {}
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir() and path.suffix.lower() not in IMAGE_SUFFIXES:
            found = sorted(
                str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif not path.exists() and glob.has_magic(pattern):
            found = sorted(glob.glob(pattern, recursive=True))
        else:
            found = [pattern]  # missing files still get an error line
        for item in found:
            seen.setdefault(item, None)
    return list(seen)


def completed_sources(out: Path) -> set[str]:
    """Inputs already recorded in ``out``; drops a torn last line left by a killed run."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    valid_end = raw.rfind(b"\n") + 1
    if valid_end != len(raw):
        with out.open("r+b") as handle:  # a half-written line from an interrupted run
            handle.truncate(valid_end)
    done = set()
    for line in raw[:valid_end].splitlines():
        try:
            done.add(json.loads(line)["source"])
        except (ValueError, KeyError, TypeError):
            continue
    return done


def emit_record(record: dict, sink, as_json: bool, many: bool) -> None:
    """One input's line: JSONL to --out and/or stdout, else plain text on stdout."""
    line = json.dumps(record, ensure_ascii=False)
    if sink:
        sink.write(line + "\n")
        sink.flush()
    if as_json:
        print(line, flush=True)
    elif not sink:
        text = record["generated_text"] if record["status"] == "ok" else f"ERROR: {record['error']}"
        print(f"{record['source']}\t{text}" if many else text, flush=True)
