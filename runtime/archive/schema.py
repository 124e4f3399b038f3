"""What the archive file holds: its tables, its FTS tokenizer, and how a caption record becomes
a row.

A caption record is what ``watch`` writes (``CaptionResult.to_record()`` plus the stream
fields). ``RECORD_FIELDS`` declares how each of its keys maps onto a column; the one renaming is
there: the record's ``generated_text`` (the HF pipeline's name, kept in every edgecap output) is
stored as ``caption``, the name the FTS index, search results and events use.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import EdgecapError

SCHEMA_VERSION = 2  # 2: captions_tags (a version-1 archive gains it when opened to write)
# The FTS5 tokenizer of the caption index (porter stemming: "dogs" finds "dog"). Alert rules
# build their one-row index with it too, so a rule matches what `edgecap search` finds.
FTS_TOKENIZER = "porter unicode61"
TimeLike = dt.datetime | str | float | int


class ArchiveError(EdgecapError):
    """The archive file or a request to it is unusable; the message names the input and why."""


# IF NOT EXISTS everywhere: two processes may create the same new archive at once; the script
# runs inside BEGIN IMMEDIATE, so the second one finds the first one's tables and changes nothing.
SCHEMA = f"""
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
    caption, content='captions', content_rowid='id', tokenize='{FTS_TOKENIZER}'
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


def to_utc(value: TimeLike) -> dt.datetime:
    """An aware UTC datetime from a datetime, epoch seconds or ISO text (naive = UTC)."""
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc)
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def epoch(value: TimeLike) -> float:
    """UTC epoch seconds of ``value`` (see ``to_utc``): how wall times are filtered and sorted."""
    return to_utc(value).timestamp()


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _caption_text(value: Any) -> str:
    if not isinstance(value, str):
        raise KeyError("generated_text")  # no text is a missing caption, not a bad value
    return value


@dataclass(frozen=True)
class RecordField:
    """One key of a caption record and the archive column it is stored in."""

    key: str  # in the record
    column: str  # in the captions table
    convert: Callable[[Any], Any]  # raises TypeError/ValueError on a bad value
    required: bool = True
    also: tuple[str, ...] = ()  # other keys read when ``key`` is absent


# In the order they are checked: a record without its text is reported as that first.
RECORD_FIELDS: tuple[RecordField, ...] = (
    # A record that already says `caption` (the archive's word, as a search hit does) is read too.
    RecordField("generated_text", "caption", _caption_text, also=("caption",)),
    RecordField("camera", "camera", str),
    RecordField("stream_time", "stream_time", float),
    RecordField("wall_time", "wall_time", str),
    RecordField("frame_index", "frame_index", int),
    RecordField("score", "score", _optional_float, required=False),
    RecordField("latency_ms", "latency_ms", _optional_float, required=False),
)
# Columns computed on the way in rather than copied from a record key.
_DERIVED = ("wall_ts", "snapshot", "snapshot_bytes")
_COLUMNS = tuple(f.column for f in RECORD_FIELDS) + _DERIVED
# The watermark carries the newest wall_ts so far forward (see the captions table).
INSERT_SQL = (f"INSERT INTO captions ({', '.join(_COLUMNS)}, watermark) VALUES "
              f"({', '.join(':' + c for c in _COLUMNS)}, max(:wall_ts, coalesce((SELECT "
              "watermark FROM captions ORDER BY id DESC LIMIT 1), :wall_ts)))")
HIT_COLUMNS = """c.id, c.camera, c.stream_time, c.wall_time, c.frame_index, c.caption, c.score,
    c.latency_ms, c.snapshot"""


def _value(record: Mapping[str, Any], field: RecordField) -> Any:
    for key in (field.key, *field.also):
        if key in record:
            return field.convert(record[key])
    if field.required:
        raise KeyError(field.key)
    return None


def record_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """The INSERT parameters of a caption record; unknown keys are ignored.

    Raises:
        ArchiveError: a required key is missing or a value is malformed (named).
    """
    try:
        row = {field.column: _value(record, field) for field in RECORD_FIELDS}
        row["wall_ts"] = epoch(row["wall_time"])
        row["snapshot"], row["snapshot_bytes"] = _snapshot_file(record.get("snapshot"))
    except KeyError as exc:
        raise ArchiveError(f"caption record: missing {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ArchiveError(f"caption record: bad value ({exc})") from None
    return row


def record_tags(record: Mapping[str, Any]) -> list[tuple[str, float]]:
    """``(label, score)`` of a record's ``tags`` (a grounded model's); none when it has none."""
    tags = record.get("tags") or []
    try:
        return [(str(tag["label"]).lower(), float(tag["score"])) for tag in tags]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArchiveError(f"caption record: bad tags ({exc!r}); expected "
                           '[{"label": ..., "score": ...}]') from None


def _snapshot_file(path: Any) -> tuple[str | None, int]:
    """Absolute path (so any reader finds it whatever its working folder) and its size."""
    if path in (None, ""):
        return None, 0
    absolute = Path(os.fspath(path)).absolute()
    try:
        return str(absolute), absolute.stat().st_size
    except OSError:  # not written (yet): counts as no disk use
        return str(absolute), 0
