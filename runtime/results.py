"""What captioning returns, and the one way it is written out.

``CaptionResult.to_record()`` and ``CaptionFailure.to_record()`` are the only serialisations:
JSONL lines (``caption --out``), HTTP bodies (``serve``) and watch records (which add their
stream fields) all use them. Keys follow the Hugging Face image-to-text pipeline
(``generated_text``); ``RECORD_KEYS`` declares every key once, and the Ray table schema, the
alert payload and the OpenAPI text are derived from it (docs/options.md describes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import EdgecapError
from .grounding import Tag


Record = Literal["ok", "error", "stream", "alert"]


@dataclass(frozen=True)
class RecordKey:
    """One key of the result record: its JSON Schema, its meaning, and the records that carry
    it ("ok": every caption, "error": a failed input, "stream": what watch adds, "alert": the
    alert payloads and camera state messages)."""

    name: str
    schema: dict[str, Any]
    description: str
    records: frozenset[Record]


def _key(name: str, schema: dict[str, Any], description: str, *records: Record) -> RecordKey:
    return RecordKey(name, schema, description, frozenset(records))


_TEXT, _NUMBER, _INTEGER = {"type": "string"}, {"type": "number"}, {"type": "integer"}
_TAG = {"type": "object", "properties": {"label": _TEXT, "score": _NUMBER}}
RECORD_KEYS: tuple[RecordKey, ...] = (
    _key("source", _TEXT, "the input: a path as given, an upload's file name, a watched file's "
         "name or the stream", "ok", "error"),
    _key("status", {"type": "string", "enum": ["ok", "error"]}, "ok, or error when the input "
         "produced no caption", "ok", "error"),
    _key("generated_text", _TEXT, "the caption", "ok", "alert"),
    _key("score", _NUMBER, "beam search: the best beam's length-normalised log-probability; "
         "greedy: the mean token log-probability", "ok", "alert"),
    _key("token_ids", {"type": "array", "items": _INTEGER}, "tokenizer ids, without the end "
         "token", "ok"),
    _key("tags", {"type": "array", "items": _TAG}, "grounded models: presence labels and "
         "ImageNet classes with their scores (empty for other models)", "ok", "alert"),
    _key("latency_ms", _NUMBER, "milliseconds for the image's batch (watch: frame received to "
         "caption ready)", "ok"),
    _key("error", _TEXT, "why the input produced no caption", "error"),
    _key("stream_time", _NUMBER, "seconds on the source's clock", "stream", "alert"),
    _key("wall_time", _TEXT, "ISO 8601 UTC time when the caption was ready", "stream", "alert"),
    _key("frame_index", _INTEGER, "the frame's index in the stream", "stream", "alert"),
    _key("dropped", _INTEGER, "stale frames dropped since the previous record", "stream"),
    _key("reason", _TEXT, "why the frame was captioned: first, scene or heartbeat", "stream"),
    _key("camera", _TEXT, "the camera's name (watch --camera or the config file's)", "stream",
         "alert"),
    _key("snapshot", _TEXT, "the saved frame's path (watch --archive --snapshots)", "stream",
         "alert"),
)


def record_keys(*records: Record) -> tuple[str, ...]:
    """The names of the keys that any of ``records`` carries, in declaration order."""
    return tuple(key.name for key in RECORD_KEYS if key.records & set(records))


@dataclass
class CaptionResult:
    """One image's caption.

    ``token_ids`` are tokenizer (GPT-2) ids without the end token; ``score`` is the beam's
    length-normalised log-probability (beam search) or the mean token log-probability (greedy);
    ``timings`` are milliseconds for the batch this image was decoded in. ``tags``: a grounded
    model's presence labels and ImageNet classes with their scores (empty for other models).
    """

    text: str
    token_ids: list[int]
    score: float
    source: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    tags: list[Tag] = field(default_factory=list)

    ok = True

    @property
    def generated_text(self) -> str:
        return self.text

    def to_record(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (see docs/options.md for the keys)."""
        return {
            "source": self.source,
            "status": "ok",
            "generated_text": self.text,
            "score": round(float(self.score), 4),
            "token_ids": list(self.token_ids),
            "tags": [tag.to_record() for tag in self.tags],
            "latency_ms": round(self.timings.get("total_ms", 0.0), 2),
        }

    def tag_score(self, label: str) -> float | None:
        """The score of ``label`` among the tags, or None when the result has no such tag."""
        return next((tag.score for tag in self.tags if tag.label == label), None)


@dataclass
class CaptionFailure:
    """An input that produced no caption; ``error`` says why (it names the input)."""

    source: str
    error: EdgecapError

    ok = False

    @property
    def reason(self) -> str:
        return getattr(self.error, "reason", None) or str(self.error)

    def to_record(self) -> dict[str, Any]:
        return {"source": self.source, "status": "error", "error": self.reason}
