"""The caption archive: an sqlite3/FTS5 store, its searches and their limits, and the
background writer."""

from .hits import Event, Hit, events
from .limits import QueryLimits, QueryRefused
from .query import SearchQuery, parse_time
from .schema import ArchiveError
from .store import Archive

__all__ = ["Archive", "ArchiveError", "Event", "Hit", "QueryLimits", "QueryRefused",
           "SearchQuery", "events", "parse_time"]
