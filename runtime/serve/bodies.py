"""What every HTTP route of ``serve`` shares below the service: reading a bounded body in time,
and the exception a handler raises to answer with an error instead of captions. Kept apart from
``app.py`` so the compatible APIs (``compat*.py``), which the server mounts, never import it
back."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes | None:
    """The request body, or None as soon as it exceeds ``limit`` bytes.

    Raises:
        asyncio.TimeoutError: the body did not arrive within ``timeout_s`` (a client trickling
            bytes would otherwise hold its connection and its memory forever).
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    body = await asyncio.wait_for(_stream_body(request, limit), timeout_s)
    if body is None:
        return None
    request._body = body  # Starlette re-reads a cached body when parsing multipart forms
    return body


async def _stream_body(request: Request, limit: int) -> bytes | None:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class Rejected(Exception):
    """A request answered with an error response instead of captions.

    ``status``, ``kind`` and ``detail`` let the compatible APIs answer in their own error shape.
    """

    def __init__(self, status: int, kind: str, detail: str, response: JSONResponse):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.response = status, kind, detail, response
