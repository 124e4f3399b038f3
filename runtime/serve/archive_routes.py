"""``serve --archive``: search the caption archive over HTTP and fetch snapshots by id.

``GET /v1/events`` (the query fields of ``SearchQuery``) answers JSON; ``GET
/v1/snapshots/{id}`` answers the JPEG. Snapshots are found by caption id only (the archive
looks the file up), never by a path a client sends, and responses carry snapshot URLs, never
file-system paths.

Cost: searches run in a small pool of their own (``SEARCH_THREADS``), each on its own read
connection and within ``QueryLimits``; more than ``MAX_WAITING`` searches waiting get 503 at
once, so searches can neither hold the archive nor starve captioning of threads. Snapshots are
served only from inside the snapshot folder, after resolving symlinks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..archive import Archive, ArchiveError, QueryLimits, QueryRefused, SearchQuery

log = logging.getLogger(__name__)

SEARCH_THREADS = 2  # searches at once: the rest of the machine stays with captioning
MAX_WAITING = 16  # searches queued behind those; more get 503 at once
MAX_SNAPSHOT_BYTES = 16 * 2**20  # snapshots are small JPEGs; a bigger file is not one of ours


class ArchiveRoutes:
    """The archive endpoints; ``snapshots`` is the folder snapshots may be served from
    (default: the archive's own folder)."""

    def __init__(self, path: str | Path, snapshots: str | Path | None = None,
                 limits: QueryLimits = QueryLimits()):
        self.archive = Archive.open(path)  # created if missing, so serve may start first
        self.snapshot_root = os.path.realpath(snapshots or Path(path).absolute().parent)
        self.limits = limits
        self.pool = ThreadPoolExecutor(SEARCH_THREADS, thread_name_prefix="edgecap-search")
        self.waiting = 0  # searches in the pool or queued for it (event loop only)

    def routes(self) -> list[Route]:
        return [Route("/v1/events", self.search), Route("/v1/snapshots/{id}", self.snapshot)]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.archive.close()

    async def _run(self, work: Callable, *args: Any) -> Any:
        """``work(*args)`` in the search pool.

        Raises:
            QueryRefused: (busy) too many searches are already waiting.
        """
        if self.waiting >= SEARCH_THREADS + MAX_WAITING:
            raise QueryRefused("too many searches at once; retry shortly", busy=True)
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, work, *args)
        finally:
            self.waiting -= 1

    async def search(self, request: Request) -> Response:
        try:
            query = SearchQuery.from_fields(request.query_params)
            hits = await self._run(query.search, self.archive, self.limits)
        except QueryRefused as exc:
            if exc.busy:
                return JSONResponse({"error": "search_busy", "detail": exc.reason},
                                    status_code=503, headers={"Retry-After": "1"})
            return JSONResponse({"error": "query_too_costly", "detail": exc.reason},
                                status_code=400)
        except (ArchiveError, ValueError) as exc:
            return JSONResponse({"error": "bad_query", "detail": str(exc)}, status_code=400)
        found = [item.to_dict(snapshot_url=_snapshot_url) for item in query.results(hits)]
        return JSONResponse({"query": query.q, "hits" if query.frames else "events": found})

    async def snapshot(self, request: Request) -> Response:
        text = request.path_params["id"]
        try:
            data = await self._run(self._snapshot, _bounded_int(text, "id", 1, 2**63 - 1))
        except QueryRefused as exc:
            return JSONResponse({"error": "search_busy", "detail": exc.reason},
                                status_code=503, headers={"Retry-After": "1"})
        except (ArchiveError, ValueError):
            data = None
        if data is None:
            return JSONResponse({"error": "not_found", "detail": "no snapshot with this id"},
                                status_code=404)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    def _snapshot(self, id: int) -> bytes | None:
        """The snapshot's bytes if its real path lies inside the snapshot folder, else None.

        The row's path is resolved (symlinks included) and opened without following a link
        at the last step, so neither a row nor a link placed in the folder reaches other files.
        """
        path = self.archive.snapshot(id)
        if path is None:
            return None
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.snapshot_root]) != self.snapshot_root:
            log.warning("snapshot of caption %d is outside the snapshot folder; not served", id)
            return None
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SNAPSHOT_BYTES:
                return None
            return file.read(MAX_SNAPSHOT_BYTES)


def _bounded_int(text: str, name: str, low: int, high: int) -> int:
    """ASCII digits only (``int`` would take other scripts' digits), within [low, high]."""
    if not re.fullmatch(r"[0-9]{1,19}", text):
        raise ValueError(f"{name} must be an integer from {low} to {high} (got {text[:40]!r})")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high} (got {text[:40]!r})")
    return value


def _snapshot_url(hit_id: int) -> str:
    return f"/v1/snapshots/{hit_id}"
