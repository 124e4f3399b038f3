"""``serve --archive``: search the caption archive over HTTP and fetch snapshots by id.

``GET /v1/events?q=&camera=&since=&until=&limit=&frames=`` answers JSON; ``GET
/v1/snapshots/{id}`` answers the JPEG. Snapshots are found by caption id only (the archive
looks the file up), never by a path a client sends, and responses carry snapshot URLs, never
file-system paths.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .archive import DEFAULT_GAP_S, Archive, ArchiveError, Event, Hit, events, parse_time

MAX_LIMIT = 1000  # hits per request: a bound on the work one request can ask for


class ArchiveRoutes:
    """The archive endpoints over one read connection (the archive serializes its calls)."""

    def __init__(self, path: str | Path):
        self.archive = Archive.open(path)  # created if missing, so serve may start first

    def routes(self) -> list[Route]:
        return [Route("/v1/events", self.search), Route("/v1/snapshots/{id}", self.snapshot)]

    def close(self) -> None:
        self.archive.close()

    async def search(self, request: Request) -> Response:
        try:
            query = _search_query(dict(request.query_params))
            hits = await run_in_threadpool(self._search, query)
        except (ArchiveError, ValueError) as exc:
            return JSONResponse({"error": "bad_query", "detail": str(exc)}, status_code=400)
        if query["frames"]:
            return JSONResponse({"query": query["q"], "hits": [_hit(h) for h in hits]})
        merged = events(hits, gap_s=query["gap"])
        return JSONResponse({"query": query["q"], "events": [_event(e) for e in merged]})

    def _search(self, query: dict[str, Any]) -> list[Hit]:
        return self.archive.search(query["q"], camera=query["camera"], since=query["since"],
                                   until=query["until"], limit=query["limit"])

    async def snapshot(self, request: Request) -> Response:
        text = request.path_params["id"]
        path = await run_in_threadpool(self.archive.snapshot, int(text)) if text.isdigit() else None
        if path is None:
            return JSONResponse({"error": "not_found", "detail": "no snapshot with this id"},
                                status_code=404)
        return FileResponse(path, media_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=3600"})


def _search_query(params: dict[str, str]) -> dict[str, Any]:
    """Validated search parameters; ValueError/ArchiveError name the bad one."""
    q = params.get("q", "").strip()
    if not q:
        raise ValueError("q: give a search query, e.g. q=person or q=\"red car\"")
    limit = params.get("limit") or "50"
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT} (got {limit!r})")
    try:
        gap = float(params.get("gap") or DEFAULT_GAP_S)
    except ValueError:
        raise ValueError(f"gap must be a number of seconds (got {params['gap']!r})") from None
    return {
        "q": q, "camera": params.get("camera") or None, "limit": int(limit), "gap": gap,
        "since": _time(params, "since"), "until": _time(params, "until"),
        "frames": params.get("frames", "").lower() in ("1", "true", "yes"),
    }


def _time(params: dict[str, str], key: str):
    if not params.get(key):
        return None
    try:
        return parse_time(params[key])
    except ArchiveError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _snapshot_url(hit_id: int, path: str | None) -> str | None:
    return f"/v1/snapshots/{hit_id}" if path else None


def _hit(hit: Hit) -> dict[str, Any]:
    data = dataclasses.asdict(hit)
    data["snapshot_url"] = _snapshot_url(hit.id, data.pop("snapshot"))
    return data


def _event(event: Event) -> dict[str, Any]:
    data = dataclasses.asdict(event)
    data.pop("hits")
    data.pop("snapshot")
    with_snapshot = next((h for h in event.hits if h.snapshot == event.snapshot), None)
    data["snapshot_url"] = _snapshot_url(with_snapshot.id, event.snapshot) if with_snapshot else None
    return data
