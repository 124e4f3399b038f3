"""What a search returns: each matching caption (``Hit``), hits merged into ``Event``\\ s, and
their JSON form, the same for ``edgecap search --json`` and ``GET /v1/events``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from .schema import epoch

DEFAULT_GAP_S = 60.0  # hits of one camera closer than this in wall time form one event
# Makes the URL a server answers a caption's snapshot at, from the caption's id.
SnapshotUrl = Callable[[int], str]


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

    def to_dict(self, snapshot_url: SnapshotUrl | None = None) -> dict[str, Any]:
        """The hit as JSON; with ``snapshot_url``, ``snapshot_url`` replaces the file path (a
        server names snapshots by caption id, never by a path on its disk)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if snapshot_url is not None:
            data.pop("snapshot")
            data["snapshot_url"] = snapshot_url(self.id) if self.snapshot else None
        return data


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

    def to_dict(self, snapshot_url: SnapshotUrl | None = None) -> dict[str, Any]:
        """The event as JSON, without its hits (``ids`` says which captions, ``caption`` what
        happened); ``snapshot_url`` as for ``Hit.to_dict``."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hits"}
        data["ids"] = list(self.ids)
        if snapshot_url is not None:
            data.pop("snapshot")
            shown = next((h.id for h in self.hits if h.snapshot == self.snapshot), None)
            data["snapshot_url"] = (snapshot_url(shown) if self.snapshot and shown is not None
                                   else None)
        return data


def events(hits: Iterable[Hit], gap_s: float = DEFAULT_GAP_S) -> list[Event]:
    """Merge hits of one camera into events: in wall-time order, a hit no more than ``gap_s``
    after the previous hit of that camera joins its event.

    Events come back in the order of their best hit's rank (then newest first).
    """
    by_camera: dict[str, list[tuple[float, Hit]]] = {}
    for hit in hits:
        by_camera.setdefault(hit.camera, []).append((epoch(hit.wall_time), hit))
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
    merged.sort(key=lambda e: (e.rank, -epoch(e.end)))
    return merged


def _event(hits: list[Hit]) -> Event:
    best = min(hits, key=lambda h: h.rank)
    snapshot = next((h.snapshot for h in hits if h.snapshot and Path(h.snapshot).is_file()), None)
    return Event(camera=hits[0].camera, start=hits[0].wall_time, end=hits[-1].wall_time,
                 stream_start=hits[0].stream_time, stream_end=hits[-1].stream_time,
                 caption=best.caption, snapshot=snapshot, rank=best.rank,
                 ids=[h.id for h in hits], hits=hits)
