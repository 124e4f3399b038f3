"""OpenAI Chat Completions subset on ``edgecap serve``, for clients with an OpenAI base URL.

``GET /v1/models`` and ``POST /v1/chat/completions`` (plain and ``stream: true``). The images
of the last user message that has images are captioned (see ``compat`` for the joined answer);
text parts and the prompt are read past. Options that would change the answer and cannot be
honoured are refused with 400 naming them; sampling options are accepted and ignored, because
decoding is deterministic. docs/integrations.md has the details.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .compat import (
    MODEL_ID,
    PROMPT_HEADER,
    Answer,
    CompatError,
    describe,
    inline_image,
    loaded,
    model_created,
    model_ids,
    native_options,
    now_ns,
    read_json,
    style_of,
)

if TYPE_CHECKING:  # the server mounts these routes: no import back at run time
    from .app import CaptionService


def _set(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {})


def _not_text(value: Any) -> bool:
    return value is not None and not (isinstance(value, dict) and value.get("type") == "text")


# Fields whose value would change what a real model answers, and that a captioner cannot honour:
# field -> (is the value one we cannot honour?, why).
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v not in (None, 1), "only n=1: every choice would be the same caption"),
    "tools": (_set, "tool calls are not supported: the model writes captions"),
    "functions": (_set, "function calls are not supported: the model writes captions"),
    "tool_choice": (lambda v: v not in (None, "none", "auto"), "tool calls are not supported"),
    "response_format": (_not_text, "only text answers are supported: a caption is not JSON"),
    "logprobs": (_set, "log-probabilities are not returned"),
    "top_logprobs": (_set, "log-probabilities are not returned"),
    "logit_bias": (_set, "logit_bias is not supported"),
    "stop": (_set, "stop sequences are not supported"),
    "frequency_penalty": (_set, "not supported; edgecap's own repetition_penalty is"),
    "presence_penalty": (_set, "not supported; edgecap's own repetition_penalty is"),
    "audio": (_set, "audio output is not supported"),
    "modalities": (lambda v: v not in (None, ["text"]), "only text output is supported"),
    "prediction": (_set, "predicted outputs are not supported"),
}


class OpenAIRoutes:
    """The OpenAI-compatible endpoints over one ``CaptionService``."""

    def __init__(self, service: CaptionService):
        self.service = service

    def routes(self) -> list[Route]:
        return [Route("/v1/models", self.models),
                Route("/v1/models/{model:path}", self.model),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]

    async def models(self, request: Request) -> Response:
        try:
            manifest = loaded(self.service)
        except CompatError as exc:
            return self._error(exc)
        return JSONResponse({"object": "list", "data": [self._model(model_id) for model_id
                                                        in model_ids(manifest.styles)]})

    async def model(self, request: Request) -> Response:
        model = request.path_params["model"]
        try:
            style_of(model, loaded(self.service).styles)
        except CompatError as exc:
            return self._error(exc)
        return JSONResponse(self._model(model))

    def _model(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": int(model_created(self.service)),
                "owned_by": "edgecap"}

    async def chat_completions(self, request: Request) -> Response:
        started = now_ns()
        try:
            body = await read_json(self.service, request)
            _check_supported(body)
            # llama.cpp's server answers without a model name, and clients made for it send none.
            body["model"] = body.get("model") or MODEL_ID
            style = style_of(body["model"], loaded(self.service).styles)
            stream = _boolean(body, "stream")
            include_usage = stream and _boolean(body.get("stream_options") or {}, "include_usage")
            images = _images(body.get("messages"))
            answer = await describe(self.service, request, images, native_options(body),
                                    style, _token_budget(body), started)
        except CompatError as exc:
            return self._error(exc)
        completion_id, model = f"chatcmpl-{uuid.uuid4().hex}", str(body["model"])
        created = int(time.time())
        if not stream:
            return JSONResponse(_completion(answer, completion_id, model, created),
                                headers=PROMPT_HEADER)
        events = _chunks(answer, completion_id, model, created, include_usage)
        return StreamingResponse(_sse(events), media_type="text/event-stream",
                                 headers=PROMPT_HEADER)

    def _error(self, exc: CompatError) -> JSONResponse:
        """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
        exc.count(self.service)
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        body = {"error": {"message": exc.message, "type": kind, "param": exc.param,
                          "code": exc.kind}}
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def _check_supported(body: dict[str, Any]) -> None:
    for field, (cannot_honour, why) in REFUSED.items():
        if cannot_honour(body.get(field)):
            raise CompatError(400, "unsupported_option", f"{field}: {why}", field)


def _boolean(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False) if isinstance(fields, dict) else False
    if not isinstance(value, bool) and value is not None:
        raise CompatError(400, "bad_request", f"{name}: expected true or false", name)
    return bool(value)


def _token_budget(body: dict[str, Any]) -> int | None:
    """``max_completion_tokens`` (or its older name ``max_tokens``): a cap on the caption."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CompatError(400, "bad_options", f"{name}: expected an integer >= 1", name)
        return value
    return None


def _images(messages: Any) -> list[tuple[str, bytes]]:
    """(name, bytes) of the images in the last user message that has any, in order.

    Raises:
        CompatError: 400 for malformed messages, unsupported parts, URLs or bad base64.
    """
    if not isinstance(messages, list) or not messages:
        raise CompatError(400, "bad_request", "messages: expected a non-empty list", "messages")
    found: list[tuple[str, bytes]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise CompatError(400, "bad_request", f"messages[{i}]: expected an object",
                              "messages")
        images = _message_images(message, f"messages[{i}]")
        if images and message.get("role") == "user":
            found = images  # a later message with images replaces the earlier ones
    return found


def _message_images(message: dict[str, Any], where: str) -> list[tuple[str, bytes]]:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return []
    if not isinstance(content, list):
        raise CompatError(400, "bad_request", f"{where}.content: expected a string or a list",
                          "messages")
    images = []
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        if isinstance(part, str):  # Frigate sends its prompt as a bare string after the images
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            continue
        if kind != "image_url":
            raise CompatError(400, "unsupported_content",
                              f"{here}: content type {kind!r} is not supported (text, image_url)",
                              "messages")
        reference = part.get("image_url")
        url = reference.get("url") if isinstance(reference, dict) else reference
        images.append((here, inline_image(url, f"{here}.image_url.url")))
    return images


def _usage(answer: Answer) -> dict[str, int]:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


def _completion(answer: Answer, completion_id: str, model: str, created: int) -> dict[str, Any]:
    message = {"role": "assistant", "content": answer.text, "refusal": None}
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": answer.finish_reason}],
            "usage": _usage(answer), "edgecap": {"results": answer.records()}}


def _chunks(answer: Answer, completion_id: str, model: str, created: int,
            include_usage: bool) -> list[dict[str, Any]]:
    """The stream's chunks. The caption is complete before the first one is sent (it takes
    milliseconds), so it travels as one content delta."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        usage = {"usage": None} if include_usage else {}
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}], **usage, **extra}

    chunks = [chunk({"role": "assistant", "content": ""}), chunk({"content": answer.text}),
              chunk({}, answer.finish_reason, edgecap={"results": answer.records()})]
    if include_usage:  # as OpenAI does: a last chunk with no choices carries the usage
        chunks.append({**chunk({}), "choices": [], "usage": _usage(answer)})
    return chunks


async def _sse(chunks: list[dict[str, Any]]) -> AsyncIterator[str]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"
