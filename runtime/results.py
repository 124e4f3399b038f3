"""What captioning returns, and the one way it is written out.

``CaptionResult.to_record()`` and ``CaptionFailure.to_record()`` are the only serialisations:
JSONL lines (``caption --out``), HTTP bodies (``serve``) and watch records (which add their
stream fields) all use them. Keys follow the Hugging Face image-to-text pipeline
(``generated_text``); docs/options.md lists every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import EdgecapError
from .grounding import Tag


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
