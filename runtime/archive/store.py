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

import datetime as dt
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .limits import QueryLimits, budget
from ..errors import EdgecapError

SCHEMA_VERSION = 2  # 2: captions_tags (a version-1 archive gains it when opened to write)
PROTECTED_S = 3600.0  # the newest hour is never pruned: it is what users ask about first
PRUNE_BATCH = 200  # rows per delete transaction: each write lock stays short for the cameras
DEFAULT_GAP_S = 60.0  # hits of one camera closer than this in wall time form one event
DEFAULT_CANDIDATES = 1000  # newest matches ranked per search: bm25 is the cost of a common word
LAG_SLACK_S = 1e-3  # float rounding of watermark - wall_ts when bounding ids by `until`
TimeLike = dt.datetime | str | float | int
MAX_DURATION_S = 36500 * 86400.0  # the longest `since` / `until` duration accepted

# IF NOT EXISTS everywhere: two processes may create the same new archive at once; the script
# runs inside BEGIN IMMEDIATE, so the second one finds the first one's tables and changes nothing.
SCHEMA = """
CREATE TABLE IF NOT EXISTS captions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a stale id never finds a new image
    camera TEXT NOT NULL,
    stream_time REAL NOT NULL,
    wall_time TEXT NOT NULL,    -- ISO 8601 as recorded
    wall_ts REAL NOT NULL,      -- the same instant as UTC epoch seconds: filters and sorts
    frame_index INTEGER NOT NULL,
    caption TEXT NOT NULL,
    score REAL,
    latency_ms REAL,
    snapshot TEXT,              -- absolute path of the frame's image file, or NULL
    snapshot_bytes INTEGER NOT NULL DEFAULT 0,
    -- The newest wall_ts among this row and every older id: never decreases as ids grow, so a
    -- time window maps to an id range by two index seeks (see Archive._id_range), and the FTS
    -- scan reads only that range. Rows arrive roughly in time order, so the range is tight.
    watermark REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS captions_by_watermark ON captions (watermark);
-- One row: the running sum of snapshot sizes (prune() knows the disk use without a scan) and
-- the most any row's wall_ts lagged behind its watermark (bounds the id range of `until`; a
-- backfill of old records raises it for good, and `until` searches then scan further back).
CREATE TABLE IF NOT EXISTS totals (snapshot_bytes INTEGER NOT NULL, max_lag REAL NOT NULL);
INSERT INTO totals SELECT 0, 0.0 WHERE NOT EXISTS (SELECT 1 FROM totals);
-- External-content FTS5: the text is stored once (in captions) and the triggers keep the index
-- in step inside the writer's transaction. A contentless table (content='') would store the
-- same index, could not return or re-rank the text itself, and before SQLite 3.43 cannot delete
-- rows at all, which retention needs.
CREATE VIRTUAL TABLE IF NOT EXISTS captions_fts USING fts5 (
    caption, content='captions', content_rowid='id', tokenize='porter unicode61'
);
CREATE TRIGGER IF NOT EXISTS captions_ai AFTER INSERT ON captions BEGIN
    INSERT INTO captions_fts (rowid, caption) VALUES (new.id, new.caption);
    UPDATE totals SET snapshot_bytes = snapshot_bytes + new.snapshot_bytes,
        max_lag = max(max_lag, new.watermark - new.wall_ts);
END;
CREATE TRIGGER IF NOT EXISTS captions_ad AFTER DELETE ON captions BEGIN
    INSERT INTO captions_fts (captions_fts, rowid, caption) VALUES ('delete', old.id, old.caption);
    UPDATE totals SET snapshot_bytes = snapshot_bytes - old.snapshot_bytes;
END;
-- A grounded model's tags per caption (presence labels and ImageNet classes with their
-- scores), for `tag:person` searches; they go when their caption is pruned.
CREATE TABLE IF NOT EXISTS captions_tags (
    caption_id INTEGER NOT NULL,
    label TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (caption_id, label)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS captions_tags_by_label ON captions_tags (label, caption_id, score);
CREATE TRIGGER IF NOT EXISTS captions_tags_ad AFTER DELETE ON captions BEGIN
    DELETE FROM captions_tags WHERE caption_id = old.id;
END;
-- Rows are written once: an update would break the watermark order and the FTS sync.
CREATE TRIGGER IF NOT EXISTS captions_au BEFORE UPDATE ON captions BEGIN
    SELECT raise(ABORT, 'archived captions are read-only');
END;
"""

INSERT_SQL = """INSERT INTO captions (camera, stream_time, wall_time, wall_ts, frame_index,
    caption, score, latency_ms, snapshot, snapshot_bytes, watermark)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10,
            max(?4, coalesce((SELECT watermark FROM captions ORDER BY id DESC LIMIT 1), ?4)))"""
HIT_COLUMNS = """c.id, c.camera, c.stream_time, c.wall_time, c.frame_index, c.caption, c.score,
    c.latency_ms, c.snapshot"""


class ArchiveError(EdgecapError):
    """The archive file or a request to it is unusable; the message names the input and why."""


@dataclass(frozen=True)
class Hit:
    """One archived caption that matched a search."""

    id: int
    camera: str
    stream_time: float  # seconds on the camera stream's clock
    wall_time: str  # ISO 8601 UTC when the caption was ready
    frame_index: int
    caption: str
    score: float | None
    latency_ms: float | None
    snapshot: str | None  # path of the frame's image file, if one was saved
    rank: float  # FTS5 bm25: lower is a better match


@dataclass
class Event:
    """Consecutive hits of one camera (no two more than ``gap_s`` apart in wall time)."""

    camera: str
    start: str  # wall_time of the first hit
    end: str  # wall_time of the last hit
    stream_start: float
    stream_end: float
    caption: str  # the best-ranked hit's caption
    snapshot: str | None  # the first hit's snapshot that exists
    rank: float  # the best hit's rank
    ids: list[int] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)


@dataclass(frozen=True)
class PruneStats:
    """What ``Archive.prune`` removed and how much disk the archive uses afterwards."""

    rows_deleted: int
    snapshots_deleted: int
    disk_bytes_before: int
    disk_bytes_after: int


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
        return _utc(time.time() if now is None else now) - dt.timedelta(seconds=seconds)
    try:
        return _utc(text.strip())
    except (ValueError, AttributeError, OverflowError):  # overflow: e.g. year 9999 at -23:59
        raise ArchiveError(f"time {str(text)[:40]!r}: expected a duration like 30m, 2h, 7d "
                           "or an ISO 8601 time like 2026-11-25T14:00:00Z") from None


def _utc(value: TimeLike) -> dt.datetime:
    """An aware UTC datetime from a datetime, epoch seconds or ISO text (naive = UTC)."""
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc)
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def _ts(value: TimeLike) -> float:
    return _utc(value).timestamp()


def _time_ts(value: TimeLike) -> float:
    """Epoch seconds of a search bound; text may be anything ``parse_time`` reads."""
    return parse_time(value).timestamp() if isinstance(value, str) else _ts(value)


def _record_row(record: Mapping[str, Any]) -> tuple:
    """One INSERT row from a watch record; unknown keys are ignored."""
    try:
        text = record.get("generated_text", record.get("caption"))
        if not isinstance(text, str):
            raise KeyError("generated_text")
        snapshot, size = _snapshot_file(record.get("snapshot"))
        wall_time = str(record["wall_time"])
        score, latency = record.get("score"), record.get("latency_ms")
        return (str(record["camera"]), float(record["stream_time"]), wall_time, _ts(wall_time),
                int(record["frame_index"]), text, None if score is None else float(score),
                None if latency is None else float(latency), snapshot, size)
    except KeyError as exc:
        raise ArchiveError(f"caption record: missing {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ArchiveError(f"caption record: bad value ({exc})") from None


def _record_tags(record: Mapping[str, Any]) -> list[tuple[str, float]]:
    """``(label, score)`` of a record's ``tags`` (a grounded model's); none when it has none."""
    tags = record.get("tags") or []
    try:
        return [(str(tag["label"]).lower(), float(tag["score"])) for tag in tags]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArchiveError(f"caption record: bad tags ({exc!r}); expected "
                           '[{"label": ..., "score": ...}]') from None


# tag:person, tag:person>=0.8, tag:"space shuttle", tag:"space shuttle">=0.3
TAG_TERM = re.compile(r'(?<!\S)tag:(?:"([^"]+)"|([^\s">=]+))(?:>=(\S+))?(?!\S)', re.IGNORECASE)
PRESENT = 0.5  # a grounded model's presence heads put their operating point here


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


def _search_sql(words: str, tags: list[tuple[str, float]], camera: str | None,
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


def _snapshot_file(path: Any) -> tuple[str | None, int]:
    """Absolute path (so any reader finds it whatever its working folder) and its size."""
    if path in (None, ""):
        return None, 0
    absolute = Path(os.fspath(path)).absolute()
    try:
        return str(absolute), absolute.stat().st_size
    except OSError:  # not written (yet): counts as no disk use
        return str(absolute), 0


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
        rows = [(_record_row(record), _record_tags(record)) for record in records]
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
        since_ts, until_ts = (None if t is None else _time_ts(t) for t in (since, until))
        words, tags = split_tag_terms(query)
        sql, filters = _search_sql(words, tags, camera, since_ts, until_ts)
        conn = self._reader()
        try:
            with budget(conn, limits) if limits else nullcontext():
                ids = list(self._id_range(conn, since_ts, until_ts))
                params = [words, *ids] if words else ids
                rows = conn.execute(sql, [*params, *filters, max_candidates or -1,
                                          limit]).fetchall()
        except sqlite3.OperationalError as exc:
            raise ArchiveError(_query_error(query, exc)) from None
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
        now_ts = time.time() if now is None else _ts(now)
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
                # Age by arrival: watermark < cutoff implies wall_ts < cutoff, and the index
                # hands over the oldest batch without a scan. A late record with an old
                # wall_time stays until the rows that arrived around it age out.
                rows = conn.execute("SELECT id, snapshot, snapshot_bytes FROM captions WHERE "
                                    "watermark < ? ORDER BY watermark LIMIT ?",
                                    (cutoff, PRUNE_BATCH)).fetchall()
                if budget is not None:
                    rows = _enough(rows, *_excess(conn, budget))
                conn.executemany("DELETE FROM captions WHERE id = ?", [(r[0],) for r in rows])
            # Files go after the commit: a crash in between leaves an orphan file, never a row
            # whose snapshot is gone.
            files += sum(_unlink(r[1]) for r in rows if r[1])
            deleted += len(rows)
            if len(rows) < PRUNE_BATCH:  # none left before cutoff, or the budget is met
                return deleted, files

    def _shrink(self) -> None:
        """Hand freed pages back in small steps, then checkpoint so the files shrink."""
        with self._lock:
            for _ in range(10_000):  # bounded: each step is its own short write transaction
                if not self._conn.execute("PRAGMA freelist_count").fetchone()[0]:
                    break
                self._conn.execute("PRAGMA incremental_vacuum(256)").fetchall()
            # TRUNCATE waits (busy_timeout) for a moment without writers, copies the WAL into
            # the database (a few MB at most) and empties the WAL file.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


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


def _create_private(path: Path) -> None:
    """Create a missing archive file owner-only; SQLite gives its WAL the same mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:  # an unwritable folder: sqlite3.connect reports it with the reason
        pass


def _unlink(path: str) -> int:
    try:
        os.unlink(path)
        return 1
    except OSError:  # already gone or not ours to delete: the row is gone either way
        return 0


def _query_error(query: str, exc: sqlite3.Error) -> str:
    text = str(exc)
    if "no such table: captions_tags" in text:
        return (f"search query {query!r}: this archive predates tags (schema 1); it gains them "
                "the next time a watcher (or any writer) opens it")
    if "fts5" in text or "syntax" in text or "no such column" in text:
        return (f"search query {query!r}: {text}; put words with punctuation in double quotes, "
                'e.g. "t-shirt"')
    return f"search query {query!r}: {text}"


def events(hits: Iterable[Hit], gap_s: float = DEFAULT_GAP_S) -> list[Event]:
    """Merge hits of one camera into events: in wall-time order, a hit no more than ``gap_s``
    after the previous hit of that camera joins its event.

    Events come back in the order of their best hit's rank (then newest first).
    """
    by_camera: dict[str, list[tuple[float, Hit]]] = {}
    for hit in hits:
        by_camera.setdefault(hit.camera, []).append((_ts(hit.wall_time), hit))
    merged: list[Event] = []
    for timed in by_camera.values():
        timed.sort(key=lambda pair: (pair[0], pair[1].id))
        group = [timed[0]]
        for previous, current in zip(timed, timed[1:]):
            if current[0] - previous[0] > gap_s:
                merged.append(_event([h for _, h in group]))
                group = []
            group.append(current)
        merged.append(_event([h for _, h in group]))
    merged.sort(key=lambda e: (e.rank, -_ts(e.end)))
    return merged


def _event(hits: list[Hit]) -> Event:
    best = min(hits, key=lambda h: h.rank)
    snapshot = next((h.snapshot for h in hits if h.snapshot and Path(h.snapshot).is_file()), None)
    return Event(camera=hits[0].camera, start=hits[0].wall_time, end=hits[-1].wall_time,
                 stream_start=hits[0].stream_time, stream_end=hits[-1].stream_time,
                 caption=best.caption, snapshot=snapshot, rank=best.rank,
                 ids=[h.id for h in hits], hits=hits)
