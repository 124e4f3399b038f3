"""``edgecap search``: find archived captions by words, camera and time."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from .arg_types import positive_int
from ..archive.store import DEFAULT_GAP_S, Archive, ArchiveError, Event, Hit, events, parse_time

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
    search.add_argument("query", help="FTS5 query, e.g. 'person door' or '\"red car\" OR truck'; "
                        "tag:person (or tag:person>=0.8) keeps captions a grounded model "
                        "scored present")
    search.add_argument("--db", required=True, help="the archive file (SQLite)")
    search.add_argument("--camera", help="only this camera")
    search.add_argument("--since", type=_time_arg, help="only captions at or after this time")
    search.add_argument("--until", type=_time_arg, help="only captions before this time")
    search.add_argument("--limit", type=positive_int, default=50,
                        help="at most this many matching captions (default 50), merged into events")
    search.add_argument("--gap", type=float, default=DEFAULT_GAP_S, metavar="SECONDS",
                        help="hits of one camera at most this far apart form one event "
                             f"(default {DEFAULT_GAP_S:g})")
    search.add_argument("--frames", action="store_true", help="one line per caption, no merging")
    search.add_argument("--json", action="store_true", help="one JSON object per line")
    search.set_defaults(handler=run)
    return search


def _time_arg(text: str):
    try:
        return parse_time(text)
    except ArchiveError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Run ``edgecap search``. Returns 0; archive problems raise ArchiveError (exit 1 in main)."""
    with Archive.open(args.db, readonly=True) as archive:
        hits = archive.search(args.query, camera=args.camera, since=args.since,
                              until=args.until, limit=args.limit)
    items: list[Hit] | list[Event] = hits if args.frames else events(hits, gap_s=args.gap)
    for item in items:
        print(_json_line(item) if args.json else _text_line(item))
    if not items:
        print(f"edgecap: no captions match {args.query!r}", file=sys.stderr)
    return 0


def _text_line(item: Hit | Event) -> str:
    if isinstance(item, Hit):
        when = item.wall_time
    else:
        when = item.start if item.start == item.end else f"{item.start} -> {item.end}"
    return f"{when}\t{item.camera}\t{item.caption}\t{item.snapshot or '-'}"


def _json_line(item: Hit | Event) -> str:
    data = dataclasses.asdict(item)
    if isinstance(item, Event):
        data.pop("hits")  # the ids say which captions; the best caption says what happened
    return json.dumps(data, ensure_ascii=False)
