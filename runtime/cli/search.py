"""``edgecap search``: find archived captions by words, camera and time."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..archive import Archive, Event, Hit, SearchQuery

DESCRIPTION = """Search the caption archive that `edgecap watch` writes. Prints one line per
event (hits of one camera that follow each other merge; --frames prints every caption instead):
time, camera, caption and snapshot path; with --json, one JSON object per line.

Query syntax (SQLite FTS5): words must all appear (`person door`); "double quotes" for a
phrase (`"red car"`); `dog OR cat`; `person NOT dog`; `walk*` matches walk, walking, walker.
Words are stemmed (`dogs` finds `dog`). Quote words with punctuation (`"t-shirt"`).
Best matches first (bm25), newest first among equals."""

EPILOG = """times: --since/--until take a duration before now (30m, 2h, 7d, 1w) or an ISO 8601
time (2026-11-25T14:00:00Z; no zone means UTC). Example:
  edgecap search 'person door' --db events.db --camera front --since 1d"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Register the ``search`` subcommand on an argparse subparsers object."""
    search = commands.add_parser(
        "search", help="search archived captions by words, camera and time",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search.add_argument("--db", required=True, help="the archive file (SQLite)")
    SearchQuery.add_arguments(search)
    search.add_argument("--json", action="store_true", help="one JSON object per line")
    search.set_defaults(handler=run)
    return search


def run(args: argparse.Namespace) -> int:
    """Run ``edgecap search``. Returns 0; archive problems raise ArchiveError (exit 1 in main)."""
    query = SearchQuery.from_args(args)
    with Archive.open(args.db, readonly=True) as archive:
        items = query.results(query.search(archive))
    for item in items:
        print(json.dumps(item.to_dict(), ensure_ascii=False) if args.json else _text_line(item))
    if not items:
        print(f"edgecap: no captions match {args.query!r}", file=sys.stderr)
    return 0


def _text_line(item: Hit | Event) -> str:
    if isinstance(item, Hit):
        when = item.wall_time
    else:
        when = item.start if item.start == item.end else f"{item.start} -> {item.end}"
    return f"{when}\t{item.camera}\t{item.caption}\t{item.snapshot or '-'}"
