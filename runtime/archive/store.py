"""Caption archive: every caption the cameras produced, searchable by words and time.

One SQLite file (stdlib ``sqlite3``, no server, no new dependency) that several ``watch``
processes, one per camera, append to while ``edgecap search`` and the HTTP server read it:

* WAL mode: readers never block the writer and the writer never blocks readers. Writers take
  turns on SQLite's single write lock; ``busy_timeout`` makes a writer wait its turn instead of
  failing at once.
* An FTS5 index over the captions (porter stemming, so "dogs" finds "dog"), ranked with bm25.
* Retention (``prune``) deletes the oldest rows and their snapshot files together, in small
  batches with short transactions, so it can run in a background thread beside captioning.

Sharing: an ``Archive`` may be shared between threads. Writes are serialized by a lock; reads
(search, get, snapshot, count) run on a read-only connection per thread, outside that lock, so a
slow search never holds up a writer or another reader. For pruning from a background thread,
open a second ``Archive`` on the same path so captioning waits only on SQLite's short per-batch
write locks, never on the whole prune.

Files are created owner-only (0600, the WAL and shared-memory files follow the database's mode):
the captions describe the inside of homes and shops.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .hits import Hit
from .limits import QueryLimits, budget
from .query import bound_epoch, query_error, search_sql, split_tag_terms
from .retention import (
    PROTECTED_S,
    PRUNE_BATCH,
    PruneStats,
    delete_oldest_batch,
    shrink,
    unlink_snapshots,
)
from .schema import (
    HIT_COLUMNS,
    INSERT_SQL,
    SCHEMA,
    SCHEMA_VERSION,
    ArchiveError,
    TimeLike,
    epoch,
    record_row,
    record_tags,
)

DEFAULT_CANDIDATES = 1000  # newest matches ranked per search: bm25 is the cost of a common word
LAG_SLACK_S = 1e-3  # float rounding of watermark - wall_ts when bounding ids by `until`


def _reason(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "not a database" in text:
        return "not a SQLite database"
    if "readonly" in text or "unable to open" in text or "disk I/O" in text:
        return f"cannot open or write the archive ({text}); is the folder writable?"
    return text


class Archive:
    """The caption archive in one SQLite file. Use ``Archive.open(path)``, ideally as a context
    manager."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False,
                 busy_timeout_s: float = 10.0):
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._local = threading.local()  # each thread's read connection (see _reader)
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()  # never _lock: a reader must not wait on a write
        self._conn = self._connect(busy_timeout_s)

    @classmethod
    def open(cls, path: str | os.PathLike, *, readonly: bool = False,
             busy_timeout_s: float = 10.0) -> Archive:
        """Open (or, unless ``readonly``, create) the archive at ``path``.

        Args:
            path: the SQLite file; created with its folder's permissions if missing.
            readonly: open for searching only; the file must exist.
            busy_timeout_s: how long a write waits for another process's write lock.

        Raises:
            ArchiveError: not a SQLite file, a newer schema, or the file/folder is unwritable.
        """
        return cls(path, readonly=readonly, busy_timeout_s=busy_timeout_s)

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._readers_lock:
            for reader in self._readers:
                reader.close()
        with self._lock:
            self._conn.close()

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection: in WAL mode it sees every committed row and
        waits on neither the writer nor ``_lock``."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            uri = f"{self.path.absolute().as_uri()}?mode=ro"
            try:
                conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                                       check_same_thread=False)
            except sqlite3.Error as exc:
                raise ArchiveError(f"{self.path}: {_reason(exc)}") from None
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _connect(self, busy_timeout_s: float) -> sqlite3.Connection:
        if self.path.is_dir():
            raise ArchiveError(f"{self.path}: is a folder, not an archive file")
        if self.readonly and not self.path.is_file():
            raise ArchiveError(f"{self.path}: no such archive")
        uri = f"{self.path.absolute().as_uri()}?mode={'ro' if self.readonly else 'rwc'}"
        if not self.readonly:
            _create_private(self.path)
        conn = None
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes the
            # write lock up front (waiting on busy_timeout) instead of failing on an upgrade.
            conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # reads the header
            self._check_version(version)
            if not self.readonly:
                self._prepare(conn, version)
            elif version == 0:
                raise ArchiveError(f"{self.path}: an empty SQLite file, not an edgecap archive")
            return conn
        except (sqlite3.Error, ArchiveError) as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, ArchiveError):
                raise
            raise ArchiveError(f"{self.path}: {_reason(exc)}") from None

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise ArchiveError(f"{self.path}: archive schema {version} is newer than this "
                               f"edgecap reads ({SCHEMA_VERSION}); upgrade edgecap")

    def _prepare(self, conn: sqlite3.Connection, version: int) -> None:
        # synchronous=NORMAL in WAL: a committed row survives a process crash (SIGKILL); a
        # power cut may lose the last commits but never corrupts the file. Worth the write rate.
        conn.execute("PRAGMA synchronous = NORMAL")
        # Truncate the WAL back to this size after checkpoints so it does not stay at its peak.
        conn.execute(f"PRAGMA journal_size_limit = {4 << 20}")
        if version == SCHEMA_VERSION:
            return
        foreign = conn.execute("SELECT name FROM sqlite_master WHERE name NOT LIKE 'captions%' "
                               "AND name NOT IN ('totals', 'sqlite_sequence')").fetchone()
        if foreign is not None:  # someone else's database: never add our tables to it
            raise ArchiveError(f"{self.path}: a SQLite database that is not an edgecap archive "
                               f"(it has a table {foreign[0]!r})")
        # Only effective before the first table exists: lets prune() hand freed pages back.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL").fetchall()  # persistent, stored in the file
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nPRAGMA user_version = "
                               f"{SCHEMA_VERSION};\nCOMMIT;")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.rollback()
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; SQLite errors become ArchiveError."""
        if self.readonly:
            raise ArchiveError(f"{self.path}: opened read-only")
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.rollback()
                    raise
            except sqlite3.Error as exc:
                raise ArchiveError(f"{self.path}: {_reason(exc)}") from None

    def add(self, record: Mapping[str, Any]) -> int:
        """Archive one caption record (a ``watch`` record). Returns its id.

        Needs ``camera``, ``stream_time``, ``wall_time`` (ISO 8601), ``frame_index`` and the
        caption as ``generated_text`` (or ``caption``); ``score``, ``latency_ms`` and
        ``snapshot`` (an image path) are optional; other keys are ignored.

        Raises:
            ArchiveError: a required key is missing or malformed, or the write failed.
        """
        return self.add_many([record])[0]

    def add_many(self, records: Iterable[Mapping[str, Any]]) -> list[int]:
        """Archive several records in one transaction (all or none). Returns their ids."""
        # Validate all before writing.
        rows = [(record_row(record), record_tags(record)) for record in records]
        ids = []
        with self._write() as conn:
            for row, tags in rows:
                ids.append(conn.execute(INSERT_SQL, row).lastrowid)
                conn.executemany("INSERT OR REPLACE INTO captions_tags VALUES (?, ?, ?)",
                                 [(ids[-1], label, score) for label, score in tags])
        return ids

    def search(self, query: str, *, camera: str | None = None, since: TimeLike | None = None,
               until: TimeLike | None = None, limit: int = 50,
               max_candidates: int | None = DEFAULT_CANDIDATES,
               limits: QueryLimits | None = None) -> list[Hit]:
        """Captions matching an FTS5 query, best bm25 first, newest first on ties.

        Ranking every match of a common word in a big archive is slow, so only the newest
        ``max_candidates`` matches (after the camera and time filters) are ranked: the result
        is exact whenever fewer captions match, and otherwise favours recent ones, which is what
        a camera archive is asked about. ``max_candidates=None`` ranks every match.

        Args:
            query: FTS5 syntax: ``person door`` (both words), ``"red car"`` (phrase),
                ``dog OR cat``, ``person NOT dog``, ``walk*`` (prefix); and tag terms, each
                a condition on the caption's tags: ``tag:person`` (score at least 0.5, a
                grounded model's "present"), ``tag:person>=0.8``, ``tag:"space shuttle">=0.2``
                (an ImageNet class's probability).
                A query of tag terms alone lists the newest captions that meet them.
            camera: only this camera's captions.
            since: only captions at or after this wall-clock time (datetime, epoch or ISO).
            until: only captions before this wall-clock time.
            limit: at most this many hits.
            max_candidates: rank at most this many of the newest matches (None: all).
            limits: bounds on the query's text, time and steps (None: unbounded).

        Raises:
            ArchiveError: a malformed query, a bad time, or an unreadable archive.
            QueryRefused: the query breaks ``limits``.
        """
        if not query or not query.strip():
            raise ArchiveError("search query is empty")
        if limit < 1 or (max_candidates is not None and max_candidates < 1):
            raise ArchiveError(f"search limit must be >= 1 (got {limit}, {max_candidates})")
        if limits is not None:
            limits.check_text(query)
        since_ts, until_ts = (None if t is None else bound_epoch(t) for t in (since, until))
        words, tags = split_tag_terms(query)
        sql, filters = search_sql(words, tags, camera, since_ts, until_ts)
        conn = self._reader()
        try:
            with budget(conn, limits) if limits else nullcontext():
                ids = list(self._id_range(conn, since_ts, until_ts))
                params = [words, *ids] if words else ids
                rows = conn.execute(sql, [*params, *filters, max_candidates or -1,
                                          limit]).fetchall()
        except sqlite3.OperationalError as exc:
            raise ArchiveError(query_error(query, exc)) from None
        except sqlite3.Error as exc:
            raise ArchiveError(f"{self.path}: {_reason(exc)}") from None
        return [Hit(*row[:-1]) for row in rows]

    def _id_range(self, conn: sqlite3.Connection, since_ts: float | None,
                  until_ts: float | None) -> tuple[int, int]:
        """The ids that can hold captions in [since, until), from the watermark index.

        A row at or after ``since`` has watermark >= since; a row before ``until`` has
        watermark < until + max_lag. Watermarks never decrease with the id, so each bound is
        the first id past a watermark value: one index seek each.
        """
        seek = "SELECT id FROM captions WHERE watermark >= ? ORDER BY watermark, id LIMIT 1"
        low, high = 0, 2**63 - 1
        if since_ts is not None:
            row = conn.execute(seek, (since_ts,)).fetchone()
            low = high if row is None else row[0]
        if until_ts is not None:
            lag = conn.execute("SELECT max_lag FROM totals").fetchone()[0]
            row = conn.execute(seek, (until_ts + lag + LAG_SLACK_S,)).fetchone()
            high = high if row is None else row[0] - 1
        return low, high

    def get(self, ids: Sequence[int]) -> list[Hit]:
        """The archived captions with these ids (rank 0), in id order; unknown ids are skipped."""
        marks = ",".join("?" * len(ids))
        rows = self._reader().execute(f"SELECT {HIT_COLUMNS}, 0.0 FROM captions AS c "
                                      f"WHERE c.id IN ({marks}) ORDER BY c.id", list(ids))
        return [Hit(*row) for row in rows.fetchall()]

    def snapshot(self, id: int) -> Path | None:
        """The snapshot image of caption ``id`` if it has one on disk, else None.

        Looked up by id only, so an HTTP endpoint never opens a path a client chose.
        """
        if not 0 < id < 2**63:  # SQLite's ids: anything else (an overflow) is no caption
            return None
        row = self._reader().execute("SELECT snapshot FROM captions WHERE id = ?",
                                     (int(id),)).fetchone()
        if row is None or row[0] is None:
            return None
        path = Path(row[0])
        return path if path.is_file() else None

    def count(self) -> int:
        """How many captions the archive holds."""
        return self._reader().execute("SELECT count(*) FROM captions").fetchone()[0]

    def disk_bytes(self) -> int:
        """Bytes on disk: the database file, its WAL and every archived snapshot file."""
        with self._lock:
            snapshots = self._conn.execute("SELECT snapshot_bytes FROM totals").fetchone()[0]
        files = (self.path, Path(f"{self.path}-wal"))
        return snapshots + sum(p.stat().st_size for p in files if p.exists())

    def prune(self, *, keep_days: float | None = None, max_disk_mb: float | None = None,
              now: TimeLike | None = None) -> PruneStats:
        """Delete the oldest captions and their snapshot files, a small batch per transaction.

        Rows older than ``keep_days`` go; then, while the archive uses more than
        ``max_disk_mb`` (database + WAL + snapshots), the oldest rows go. Age is judged in
        arrival order (a record that arrives late with an old ``wall_time`` goes with the rows
        that arrived around it). The newest hour (before ``now`` and before the newest
        caption) is never pruned, so the disk budget can be exceeded by it. Freed database
        pages are handed back to the file system at the end.

        Raises:
            ArchiveError: the archive is read-only or a write failed.
        """
        before = self.disk_bytes()
        now_ts = time.time() if now is None else epoch(now)
        protect_from = self._protected_from(now_ts)
        deleted = files = 0
        if keep_days is not None:
            cutoff = min(now_ts - keep_days * 86400.0, protect_from)
            deleted, files = self._delete_oldest(cutoff, budget=None)
        if deleted:
            self._shrink()
        budget = None if max_disk_mb is None else max_disk_mb * (1 << 20)
        for _ in range(4):  # a file shrinks less than its per-row average says: measure again
            if budget is None or self.disk_bytes() <= budget:
                break
            more, more_files = self._delete_oldest(protect_from, budget=budget)
            deleted, files = deleted + more, files + more_files
            if not more:
                break
            self._shrink()
        return PruneStats(deleted, files, before, self.disk_bytes())

    def _protected_from(self, now_ts: float) -> float:
        with self._lock:
            newest = self._conn.execute("SELECT watermark FROM captions ORDER BY id DESC "
                                        "LIMIT 1").fetchone()
        return min(now_ts, now_ts if newest is None else newest[0]) - PROTECTED_S

    def _delete_oldest(self, cutoff: float, budget: float | None) -> tuple[int, int]:
        """Delete the oldest rows before ``cutoff``, one batch per transaction: all of them, or
        with ``budget`` just enough that database pages in use + snapshots fit in it."""
        deleted = files = 0
        while True:
            with self._write() as conn:
                rows = delete_oldest_batch(conn, cutoff, budget)
            # Files go after the commit: a crash in between leaves an orphan file, never a row
            # whose snapshot is gone.
            files += unlink_snapshots(rows)
            deleted += len(rows)
            if len(rows) < PRUNE_BATCH:  # none left before cutoff, or the budget is met
                return deleted, files

    def _shrink(self) -> None:
        with self._lock:
            shrink(self._conn)


def _create_private(path: Path) -> None:
    """Create a missing archive file owner-only; SQLite gives its WAL the same mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:  # an unwritable folder: sqlite3.connect reports it with the reason
        pass

