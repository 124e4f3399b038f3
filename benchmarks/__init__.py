"""Benchmarks: run `python -m benchmarks` (see benchmarks/README.md)."""

from __future__ import annotations

import json
from pathlib import Path


def emit_report(report: dict, out: Path | None) -> None:
    """Print a benchmark's JSON report on stdout, and write it to ``out`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
