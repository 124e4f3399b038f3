"""A search of the archive, declared once: its parameters (``SEARCH_FIELDS``: the CLI's flags,
the HTTP query fields and their OpenAPI entries), the query text's tag terms, times like ``2h``,
and the SQL a search runs."""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .hits import DEFAULT_GAP_S, Event, Hit, events
from .schema import HIT_COLUMNS, ArchiveError, TimeLike, epoch, to_utc

if TYPE_CHECKING:
    from .limits import QueryLimits
    from .store import Archive

MAX_DURATION_S = 36500 * 86400.0  # the longest `since` / `until` duration accepted
DEFAULT_LIMIT = 50  # hits per search unless asked
MAX_LIMIT = 1000  # hits per HTTP request: a bound on the work one request can ask for
MAX_GAP_S = 7 * 86400.0  # event merging gap: beyond a week every hit is one event anyway
# tag:person, tag:person>=0.8, tag:"space shuttle", tag:"space shuttle">=0.3
TAG_TERM = re.compile(r'(?<!\S)tag:(?:"([^"]+)"|([^\s">=]+))(?:>=(\S+))?(?!\S)', re.IGNORECASE)
PRESENT = 0.5  # a grounded model's presence heads put their operating point here
SQLITE_MAX_INT = 2**63 - 1


def parse_time(text: str, now: TimeLike | None = None) -> dt.datetime:
    """Parse ``"30s" | "30m" | "2h" | "7d" | "1w"`` (that long before ``now``) or ISO 8601.

    ISO times without a zone are taken as UTC, like the archive's wall times.

    Returns:
        An aware UTC datetime.

    Raises:
        ArchiveError: the text is neither a duration nor an ISO 8601 time.
    """
    # ASCII digits only, and at most a century: a duration beyond any archive is a typo, and
    # subtracting it would overflow datetime.
    match = re.fullmatch(r"\s*([0-9]{1,12}(?:\.[0-9]{1,9})?)\s*([smhdw])\s*", text or "")
    if match:
        seconds = float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match[2]]
        if seconds > MAX_DURATION_S:
            raise ArchiveError(f"time {text[:40]!r}: a duration of at most 100 years (36500d)")
        return to_utc(time.time() if now is None else now) - dt.timedelta(seconds=seconds)
    try:
        return to_utc(text.strip())
    except (ValueError, AttributeError, OverflowError):  # overflow: e.g. year 9999 at -23:59
        raise ArchiveError(f"time {str(text)[:40]!r}: expected a duration like 30m, 2h, 7d "
                           "or an ISO 8601 time like 2026-11-25T14:00:00Z") from None


def bound_epoch(value: TimeLike) -> float:
    """Epoch seconds of a search bound; text may be anything ``parse_time`` reads."""
    return parse_time(value).timestamp() if isinstance(value, str) else epoch(value)


# How each kind of search parameter is typed in the OpenAPI document.
_OPENAPI_TYPES = {"query": "string", "text": "string", "time": "string", "count": "integer",
                  "seconds": "number", "switch": "boolean"}


@dataclass(frozen=True)
class SearchField:
    """One search parameter: its name, parser, bounds and help, for the CLI and HTTP alike."""

    name: str  # SearchQuery attribute, HTTP query field and OpenAPI parameter
    kind: str  # query | text | time | count | seconds | switch (see check)
    help: str  # the CLI's help and the OpenAPI description
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    # False: the maximum bounds what one HTTP request may cost; the CLI, reading its user's
    # own archive, is not held to it.
    cli_capped: bool = True
    metavar: str | None = None

    @property
    def schema(self) -> dict[str, Any]:
        """The OpenAPI schema: type, bounds and default."""
        bounds = {"minimum": self.minimum, "maximum": self.maximum, "default": self.default}
        return {"type": _OPENAPI_TYPES[self.kind],
                **{key: value for key, value in bounds.items() if value is not None}}

    def check(self, text: str, *, capped: bool = True) -> Any:
        """The value of ``text``; ValueError names the parameter and what it takes."""
        if self.kind == "query":
            if not text.strip():
                raise ValueError(f"{self.name}: give a search query, e.g. q=person or "
                                 'q="red car"')
            return text.strip()
        if self.kind == "time":
            try:
                return parse_time(text)
            except ArchiveError as exc:
                raise ValueError(f"{self.name}: {exc}") from None
        if self.kind in ("count", "seconds"):
            return self._number(text, self.maximum if capped else None)
        if self.kind == "switch":
            return text.lower() in ("1", "true", "yes")
        return text or None

    def _number(self, text: str, high: float | None) -> float | int:
        """ASCII digits only (``int`` and ``float`` take other scripts' digits, ``inf`` and
        ``nan``), within the bounds."""
        count = self.kind == "count"
        pattern = r"[0-9]{1,19}" if count else r"[0-9]{1,12}(\.[0-9]{1,9})?"
        what = "an integer" if count else "a number of seconds"
        span = (f"of at least {self.minimum:g}" if high is None
                else f"from {self.minimum:g} to {high:g}")
        problem = ValueError(f"{self.name} must be {what} {span} (got {text[:40]!r})")
        if not re.fullmatch(pattern, text.strip() if not count else text):
            raise problem
        value = int(text) if count else float(text)
        if not math.isfinite(value) or value < self.minimum or (high is not None and value > high):
            raise problem
        if value > SQLITE_MAX_INT:  # an uncapped count still has to bind as a SQLite integer
            raise problem
        return value


SEARCH_FIELDS: tuple[SearchField, ...] = (
    SearchField("q", "query", "FTS5 query, e.g. 'person door' or '\"red car\" OR truck'; "
                "tag:person (or tag:person>=0.8) keeps captions a grounded model scored present"),
    SearchField("camera", "text", "only this camera"),
    SearchField("since", "time", "only captions at or after this time: ISO 8601, or a duration "
                "before now such as 30m, 2h, 7d"),
    SearchField("until", "time", "only captions before this time"),
    SearchField("limit", "count", "at most this many matching captions, merged into events",
                default=DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT, cli_capped=False),
    SearchField("gap", "seconds", "hits of one camera at most this far apart form one event",
                default=DEFAULT_GAP_S, minimum=0.0, maximum=MAX_GAP_S, metavar="SECONDS"),
    SearchField("frames", "switch", "one line per caption, no merging", default=False),
)


def _argparse_type(field: SearchField):
    def convert(text: str) -> Any:
        try:
            return field.check(text, capped=field.cli_capped)
        except ValueError as exc:  # argparse names the flag itself
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{field.name}: ")) from None
    convert.__name__ = field.kind  # argparse names the type in some messages
    return convert


@dataclass(frozen=True)
class SearchQuery:
    """One search as ``edgecap search`` and ``GET /v1/events`` take it (see SEARCH_FIELDS)."""

    q: str
    camera: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    limit: int = DEFAULT_LIMIT
    gap: float = DEFAULT_GAP_S
    frames: bool = False  # every hit rather than events

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The search's argument (``query``) and flags on ``parser``."""
        for field in SEARCH_FIELDS:
            if field.kind == "query":  # the CLI's text is taken as typed
                parser.add_argument("query", help=field.help)
            elif field.kind == "switch":
                parser.add_argument(f"--{field.name}", action="store_true", help=field.help)
            else:
                extra = "" if field.default is None else f" (default {field.default:g})"
                parser.add_argument(f"--{field.name}", type=_argparse_type(field),
                                    default=field.default, metavar=field.metavar,
                                    help=field.help + extra)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SearchQuery:
        """The search the ``add_arguments`` flags ask for."""
        return cls(args.query, **{f.name: getattr(args, f.name) for f in SEARCH_FIELDS
                                  if f.kind != "query"})

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> SearchQuery:
        """The search HTTP query fields ask for; unset or empty fields take their default.

        Raises:
            ValueError: a field that does not parse or is out of bounds (named).
        """
        values = {}
        for field in SEARCH_FIELDS:
            text = fields.get(field.name) or ""
            values[field.name] = field.check(text) if text or field.kind == "query" else \
                field.default
        return cls(**values)

    @staticmethod
    def openapi_parameters() -> list[dict[str, Any]]:
        """The OpenAPI query parameters of ``GET /v1/events``."""
        return [{"name": f.name, "in": "query", **({"required": True} if f.kind == "query"
                                                   else {}),
                 "description": f.help, "schema": f.schema} for f in SEARCH_FIELDS]

    def search(self, archive: Archive, limits: QueryLimits | None = None) -> list[Hit]:
        """The matching captions in ``archive`` (see ``Archive.search``)."""
        return archive.search(self.q, camera=self.camera, since=self.since, until=self.until,
                              limit=self.limit, limits=limits)

    def results(self, hits: list[Hit]) -> list[Hit] | list[Event]:
        """What the search answers with: the hits themselves, or the events they form."""
        return hits if self.frames else events(hits, gap_s=self.gap)


def split_tag_terms(query: str) -> tuple[str, list[tuple[str, float]]]:
    """A search query's FTS5 words and its tag terms ``(label, least score)``.

    Raises:
        ArchiveError: a tag term's score is not a number between 0 and 1.
    """
    tags = []
    for match in TAG_TERM.finditer(query):
        label, low = (match.group(1) or match.group(2)).strip().lower(), match.group(3)
        try:
            score = PRESENT if low is None else float(low)
        except ValueError:
            score = -1.0
        if not 0.0 <= score <= 1.0:
            raise ArchiveError(f"search query {query!r}: tag:{label} needs a score between 0 "
                               f"and 1 after >= (got {low!r})")
        tags.append((label, score))
    words = " ".join(TAG_TERM.sub(" ", query).split())
    if re.search(r"(?<!\S)tag:", words, re.IGNORECASE):
        raise ArchiveError(f"search query {query!r}: write a tag term as tag:LABEL, "
                           'tag:LABEL>=SCORE or tag:"two words"')
    if tags and words.upper() in ("AND", "OR", "NOT"):
        raise ArchiveError(f"search query {query!r}: tag terms combine with words by AND only")
    return words, tags


def search_sql(words: str, tags: list[tuple[str, float]], camera: str | None,
               since_ts: float | None, until_ts: float | None) -> tuple[str, list]:
    """A search's SQL and its filter parameters; the statement takes the FTS query (when there
    are words), the id range, the filters, then the candidate and result limits."""
    where = (["captions_fts MATCH ?", "captions_fts.rowid BETWEEN ? AND ?"] if words
             else ["c.id BETWEEN ? AND ?"])
    filters: list = []
    for clause, value in (("c.camera = ?", camera), ("c.wall_ts >= ?", since_ts),
                          ("c.wall_ts < ?", until_ts)):
        if value is not None:
            where.append(clause)
            filters.append(value)
    for label, low in tags:
        where.append("EXISTS (SELECT 1 FROM captions_tags AS t WHERE t.label = ? "
                     "AND t.caption_id = c.id AND t.score >= ?)")
        filters += [label, low]
    if not words:  # tags alone: nothing to rank, newest first
        return (f"SELECT * FROM (SELECT {HIT_COLUMNS}, 0.0 AS rank, c.wall_ts AS ts "
                f"FROM captions AS c WHERE {' AND '.join(where)} ORDER BY c.id DESC LIMIT ?) "
                "ORDER BY id DESC LIMIT ?"), filters
    # Inner query: newest matches first, straight from the FTS index (CROSS JOIN keeps the FTS
    # table outermost); outer query: rank those candidates.
    return (f"SELECT * FROM (SELECT {HIT_COLUMNS}, captions_fts.rank AS rank, c.wall_ts AS ts "
            "FROM captions_fts CROSS JOIN captions AS c ON c.id = captions_fts.rowid "
            f"WHERE {' AND '.join(where)} ORDER BY captions_fts.rowid DESC LIMIT ?) "
            "ORDER BY rank, ts DESC, id DESC LIMIT ?"), filters


def query_error(query: str, exc: sqlite3.Error) -> str:
    """What was wrong with ``query``, from SQLite's complaint about it."""
    text = str(exc)
    if "no such table: captions_tags" in text:
        return (f"search query {query!r}: this archive predates tags (schema 1); it gains them "
                "the next time a watcher (or any writer) opens it")
    if "fts5" in text or "syntax" in text or "no such column" in text:
        return (f"search query {query!r}: {text}; put words with punctuation in double quotes, "
                'e.g. "t-shirt"')
    return f"search query {query!r}: {text}"
