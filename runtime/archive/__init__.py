"""The caption archive: an sqlite3/FTS5 store, its query limits, and the background writer."""

from .store import Archive

__all__ = ["Archive"]
