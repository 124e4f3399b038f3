"""Bounds on what one archive search may cost: its text, its terms, its time and its steps.

FTS5 cost grows with the number of terms and, for prefix terms (``a*``), with how many indexed
words they expand to, so a short query string can still ask for minutes of work. The text is
checked first (length, terms); SQLite then runs the query under a progress handler that stops
it once it has taken too long or executed too many virtual-machine steps.
"""

from __future__ import annotations

import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from ..errors import EdgecapError

# Words of an FTS5 query; operators and NEAR are not terms.
_TERM = re.compile(r"[^\W_]+\*?|\*", re.UNICODE)
_OPERATORS = frozenset({"AND", "OR", "NOT", "NEAR"})
# How often (in SQLite virtual-machine instructions) the progress handler looks at the clock.
CHECK_EVERY = 1000


class QueryRefused(EdgecapError):
    """A search that breaks a limit. ``busy`` is True when the server ran out of time for it
    (may succeed later) and False when the query itself is too big (must be narrowed)."""

    def __init__(self, reason: str, *, busy: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.busy = busy


@dataclass(frozen=True)
class QueryLimits:
    """What one search may ask for and spend."""

    max_chars: int = 256  # query text
    max_terms: int = 16  # words and prefixes, phrases counted word by word
    max_prefix_terms: int = 4  # ``walk*``: each expands to every indexed word it starts
    max_seconds: float = 2.0  # wall time inside SQLite
    max_steps: int = 50_000_000  # SQLite virtual-machine instructions

    def check_text(self, query: str) -> None:
        """Raises QueryRefused when ``query`` is too long or has too many terms."""
        if len(query) > self.max_chars:
            raise QueryRefused(f"search query has {len(query)} characters; at most "
                               f"{self.max_chars} are allowed")
        terms = [t for t in _TERM.findall(query) if t not in _OPERATORS]
        if len(terms) > self.max_terms:
            raise QueryRefused(f"search query has {len(terms)} terms; at most {self.max_terms} "
                               "are allowed")
        prefixes = sum(t.endswith("*") for t in terms)
        if prefixes > self.max_prefix_terms:
            raise QueryRefused(f"search query has {prefixes} prefix terms (word*); at most "
                               f"{self.max_prefix_terms} are allowed")


@contextmanager
def budget(conn: sqlite3.Connection, limits: QueryLimits) -> Iterator[None]:
    """Run the block's statements on ``conn`` within ``limits``' time and step budget.

    Raises:
        QueryRefused: the budget ran out (SQLite interrupted the statement).
    """
    deadline = time.monotonic() + limits.max_seconds
    steps = [0]
    spent: list[str] = []

    def progress() -> int:
        steps[0] += CHECK_EVERY
        if steps[0] > limits.max_steps:
            spent.append("steps")
        elif time.monotonic() > deadline:
            spent.append("time")
        return 1 if spent else 0  # nonzero: SQLite interrupts the running statement

    conn.set_progress_handler(progress, CHECK_EVERY)
    try:
        yield
    except sqlite3.OperationalError:
        if not spent:
            raise
        if spent[0] == "time":
            raise QueryRefused(f"search took longer than {limits.max_seconds:g} s and was "
                               "stopped; retry later or narrow it (fewer terms, a camera, a "
                               "time range)", busy=True) from None
        raise QueryRefused("search needs too much work and was stopped; narrow it (fewer or "
                           "longer terms, a camera, a time range)") from None
    finally:
        conn.set_progress_handler(None, 0)
