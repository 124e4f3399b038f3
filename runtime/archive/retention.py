"""Retention's steps on an archive connection: which oldest rows go, their snapshot files, and
handing freed pages back. ``Archive.prune`` runs them one short transaction at a time."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

PROTECTED_S = 3600.0  # the newest hour is never pruned: it is what users ask about first
PRUNE_BATCH = 200  # rows per delete transaction: each write lock stays short for the cameras


@dataclass(frozen=True)
class PruneStats:
    """What ``Archive.prune`` removed and how much disk the archive uses afterwards."""

    rows_deleted: int
    snapshots_deleted: int
    disk_bytes_before: int
    disk_bytes_after: int


def delete_oldest_batch(conn: sqlite3.Connection, cutoff: float,
                        budget: float | None) -> list[tuple]:
    """Delete (inside the caller's transaction) the oldest batch of rows before ``cutoff``:
    all of it, or with ``budget`` just enough that database pages in use + snapshots fit in it.

    Returns:
        The deleted rows' ``(id, snapshot, snapshot_bytes)``.
    """
    # Age by arrival: watermark < cutoff implies wall_ts < cutoff, and the index hands over the
    # oldest batch without a scan. A late record with an old wall_time stays until the rows
    # that arrived around it age out.
    rows = conn.execute("SELECT id, snapshot, snapshot_bytes FROM captions WHERE watermark < ? "
                        "ORDER BY watermark LIMIT ?", (cutoff, PRUNE_BATCH)).fetchall()
    if budget is not None:
        rows = _enough(rows, *_excess(conn, budget))
    conn.executemany("DELETE FROM captions WHERE id = ?", [(r[0],) for r in rows])
    return rows


def unlink_snapshots(rows: list[tuple]) -> int:
    """Delete the snapshot files of deleted rows; returns how many were deleted."""
    return sum(_unlink(r[1]) for r in rows if r[1])


def shrink(conn: sqlite3.Connection) -> None:
    """Hand freed pages back in small steps, then checkpoint so the files shrink."""
    for _ in range(10_000):  # bounded: each step is its own short write transaction
        if not conn.execute("PRAGMA freelist_count").fetchone()[0]:
            break
        conn.execute("PRAGMA incremental_vacuum(256)").fetchall()
    # TRUNCATE waits (busy_timeout) for a moment without writers, copies the WAL into the
    # database (a few MB at most) and empties the WAL file.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _excess(conn: sqlite3.Connection, budget: float) -> tuple[float, float]:
    """Bytes over ``budget`` (database pages in use, which the file shrinks to, + snapshots)
    and the database bytes one row takes on average."""
    one = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
    used = (one("PRAGMA page_count") - one("PRAGMA freelist_count")) * one("PRAGMA page_size")
    span = one("SELECT max(id) - min(id) + 1 FROM captions") or 1  # two seeks, unlike count(*)
    return used + one("SELECT snapshot_bytes FROM totals") - budget, used / span


def _enough(rows: list[tuple], excess: float, row_bytes: float) -> list[tuple]:
    """The oldest rows whose removal frees ``excess`` bytes (all of them if they cannot)."""
    freed = 0.0
    for n, (_, _, snapshot_bytes) in enumerate(rows):
        if freed >= excess:
            return rows[:n]
        freed += snapshot_bytes + row_bytes
    return rows


def _unlink(path: str) -> int:
    try:
        os.unlink(path)
        return 1
    except OSError:  # already gone or not ours to delete: the row is gone either way
        return 0
