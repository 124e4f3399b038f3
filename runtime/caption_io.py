"""The caption command's inputs and lines, shared by its local and Ray paths: which files a
list of paths, folders and globs names, which of them an earlier run already wrote to ``--out``,
and the one writer of JSON lines (which ``watch`` uses too). The Ray library
(``cli/caption_ray.py``) uses them without importing the command."""

from __future__ import annotations

import glob
import json
import os
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


class JsonlWriter:
    """The one writer of JSON lines: ``caption`` (local and Ray) and ``watch``.

    A record is appended to ``path`` as one line, flushed at once (a killed run leaves at most
    a torn last line, which ``completed_sources`` drops), and the file is fsynced on close.
    Stdout gets the same line (``stdout="json"``), or for people the caption alone, after its
    source when there are ``many`` inputs (``"text"``), or nothing (None).

    Raises:
        OSError: ``path`` cannot be opened for appending.
    """

    def __init__(self, path: str | os.PathLike | None, stdout: str | None = "json",
                 many: bool = True):
        if stdout not in ("json", "text", None):
            raise ValueError(f"stdout={stdout!r}: choose json, text or None")
        self.handle = open(path, "a", encoding="utf-8") if path else None
        self.stdout, self.many = stdout, many

    def write(self, record: dict) -> None:
        """One record (``CaptionResult.to_record()`` and kin) as one line."""
        line = json.dumps(record, ensure_ascii=False)
        if self.handle:
            self.handle.write(line + "\n")
            self.handle.flush()
        if self.stdout == "json":
            print(line, flush=True)
        elif self.stdout == "text":
            ok = record["status"] == "ok"
            text = record["generated_text"] if ok else f"ERROR: {record['error']}"
            print(f"{record['source']}\t{text}" if self.many else text, flush=True)

    def add(self, item) -> None:
        """An object with ``to_record()`` (a watch record), as the other watch outputs take."""
        self.write(item.to_record())

    def close(self) -> None:
        if self.handle and not self.handle.closed:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stdout_mode(as_json: bool, to_file: bool) -> str | None:
    """What ``caption`` prints: JSON with --json, else the captions unless they go to --out."""
    return "json" if as_json else None if to_file else "text"
