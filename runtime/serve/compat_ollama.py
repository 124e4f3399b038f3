"""Ollama API subset on ``edgecap serve``, for clients that speak to an Ollama host.

``GET /api/tags``, ``POST /api/show``, ``GET /api/version``, ``POST /api/generate`` and
``POST /api/chat`` with base64 ``images``. Answers stream as NDJSON unless ``stream`` is false,
as Ollama's do, and end with ``done``, ``done_reason``, token counts and durations in
nanoseconds. A request with neither prompt nor images (or no messages) only checks that the
model is loaded, as Ollama's "load" request does. docs/integrations.md has the details.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from .compat import (
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

# Options whose value would change what a real model answers and that a captioner cannot honour.
# The others Ollama knows (temperature, top_k, seed, num_ctx, ...) steer sampling or llama.cpp's
# runtime; decoding here is deterministic, so they are ignored.
REFUSED_OPTIONS = ("stop", "frequency_penalty", "presence_penalty")
NO_LIMIT = (-1, -2)  # num_predict: unlimited, or fill the context


class OllamaRoutes:
    """The Ollama-compatible endpoints over one ``CaptionService``."""

    def __init__(self, service: CaptionService):
        self.service = service
        self._digest: str | None = None

    def routes(self) -> list[Route]:
        return [Route("/api/version", self.version), Route("/api/tags", self.tags),
                Route("/api/show", self.show, methods=["POST"]),
                Route("/api/generate", self.generate, methods=["POST"]),
                Route("/api/chat", self.chat, methods=["POST"])]

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def tags(self, request: Request) -> Response:
        try:
            manifest = loaded(self.service)
        except CompatError as exc:
            return self._error(exc)
        models = [{"name": f"{name}:latest" if ":" not in name else name,
                   "model": f"{name}:latest" if ":" not in name else name,
                   "modified_at": self._modified_at(), "size": self._size(),
                   "digest": self._manifest_digest(), "details": self._details()}
                  for name in model_ids(manifest.styles)]
        return JSONResponse({"models": models})

    async def show(self, request: Request) -> Response:
        try:
            body = await read_json(self.service, request)
            manifest = loaded(self.service)
            style_of(body.get("model") or body.get("name"), manifest.styles)
        except CompatError as exc:
            return self._error(exc)
        generation = self.service.captioner.options(**self.service.settings.generation)
        parameters = "\n".join(f"{name} {value}" for name, value in vars(generation).items()
                               if value is not None)
        info = {"general.architecture": "edgecap", "edgecap.conditioning": manifest.conditioning,
                "edgecap.block_count": manifest.num_layers,
                "edgecap.attention.head_count": manifest.num_heads,
                "edgecap.context_length": manifest.max_positions,
                "edgecap.vocab_size": manifest.vocab_size,
                "edgecap.styles": list(manifest.styles)}
        return JSONResponse({"modelfile": "# an edgecap image captioner (ONNX); the prompt does "
                                          "not steer it", "parameters": parameters,
                             "template": "", "details": self._details(), "model_info": info,
                             "capabilities": ["completion", "vision"],
                             "modified_at": self._modified_at()})

    async def generate(self, request: Request) -> Response:
        return await self._answer(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._answer(request, chat=True)

    async def _answer(self, request: Request, chat: bool) -> Response:
        started = now_ns()
        try:
            body = await read_json(self.service, request)
            style = style_of(body.get("model"), loaded(self.service).styles)
            options = _options(body)
            stream = body.get("stream", True) is not False  # Ollama streams unless told not to
            images = _chat_images(body) if chat else _generate_images(body)
            if images is None:  # a "load" request: nothing to describe
                return JSONResponse(self._final(body["model"], chat, None, started, "load"))
            answer = await describe(self.service, request, images, native_options(options),
                                    style, _token_budget(options), started)
        except CompatError as exc:
            return self._error(exc)
        if not stream:
            final = self._final(body["model"], chat, answer, started, answer.finish_reason)
            return JSONResponse(final, headers=PROMPT_HEADER)
        # Streamed, the text comes in the parts before the last one, which carries none.
        part = {"model": body["model"], "created_at": _now(), **_text(chat, answer.text),
                "done": False}
        final = self._final(body["model"], chat, answer, started, answer.finish_reason,
                            with_text=False)
        return StreamingResponse(_ndjson([part, final]), media_type="application/x-ndjson",
                                 headers=PROMPT_HEADER)

    def _final(self, model: str, chat: bool, answer: Answer | None, started: int,
               reason: str, with_text: bool = True) -> dict[str, Any]:
        """The last object of an answer: its statistics, and the text unless ``with_text`` is
        false (a stream sent it before)."""
        text = answer.text if answer is not None and with_text else ""
        stats = {"total_duration": now_ns() - started, "load_duration": 0,
                 "prompt_eval_count": answer.prompt_tokens if answer else 0,
                 "prompt_eval_duration": answer.encode_ns if answer else 0,
                 "eval_count": answer.completion_tokens if answer else 0,
                 "eval_duration": answer.decode_ns if answer else 0}
        final = {"model": model, "created_at": _now(), **_text(chat, text),
                 "done": True, "done_reason": reason, **stats}
        if not chat:
            final["context"] = []  # no conversation state to carry over: captions are stateless
        if answer is not None:
            final["edgecap"] = {"results": answer.records()}
        return final

    def _error(self, exc: CompatError) -> JSONResponse:
        """Ollama's error shape: ``{"error": "message"}``."""
        exc.count(self.service)
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    def _details(self) -> dict[str, Any]:
        quantization = self.service.captioner.manifest.quantization.get("mode", "none")
        return {"parent_model": "", "format": "onnx", "family": "edgecap",
                "families": ["edgecap"], "parameter_size": "",
                "quantization_level": str(quantization)}

    def _modified_at(self) -> str:
        created = datetime.fromtimestamp(model_created(self.service), timezone.utc)
        return created.isoformat().replace("+00:00", "Z")

    def _size(self) -> int:
        return sum(p.stat().st_size for p in self.service.captioner.model_dir.iterdir()
                   if p.is_file())

    def _manifest_digest(self) -> str:
        if self._digest is None:  # the manifest names every file, so it identifies the model
            manifest = self.service.captioner.model_dir / "manifest.json"
            self._digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
        return self._digest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _text(chat: bool, text: str) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """The request's ``options``, after refusing what cannot be honoured.

    Raises:
        CompatError: 400 naming the field: ``format``, ``tools``, ``think`` or a refused option.
    """
    if body.get("format") not in (None, ""):
        raise CompatError(400, "unsupported_option",
                          "format: only text answers are supported: a caption is not JSON",
                          "format")
    if body.get("tools"):
        raise CompatError(400, "unsupported_option",
                          "tools: tool calls are not supported: the model writes captions", "tools")
    if body.get("think") not in (None, False):
        raise CompatError(400, "unsupported_option", "think: the model does not think", "think")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise CompatError(400, "bad_request", "options: expected an object", "options")
    for name in REFUSED_OPTIONS:
        if options.get(name) not in (None, 0, [], ""):
            raise CompatError(400, "unsupported_option",
                              f"options.{name}: not supported by a captioner", f"options.{name}")
    return options


def _token_budget(options: dict[str, Any]) -> int | None:
    """``num_predict`` as a cap on the caption; -1 and -2 (no limit) mean none."""
    value = options.get("num_predict")
    if value is None or value in NO_LIMIT:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CompatError(400, "bad_options", "options.num_predict: expected an integer >= 1 "
                          "(or -1: no limit)", "options.num_predict")
    return value


def _images(references: Any, where: str) -> list[tuple[str, bytes]]:
    if references is None:
        return []
    if not isinstance(references, list):
        raise CompatError(400, "bad_request", f"{where}: expected a list of base64 strings", where)
    return [(f"{where}[{i}]", inline_image(ref, f"{where}[{i}]"))
            for i, ref in enumerate(references)]


def _generate_images(body: dict[str, Any]) -> list[tuple[str, bytes]] | None:
    """The ``images`` of a generate request; None for a load request (no prompt, no images)."""
    images = _images(body.get("images"), "images")
    return None if not images and not body.get("prompt") else images


def _chat_images(body: dict[str, Any]) -> list[tuple[str, bytes]] | None:
    """The images of the last user message that has any; None for a load request."""
    messages = body.get("messages")
    if not messages:
        return None
    if not isinstance(messages, list):
        raise CompatError(400, "bad_request", "messages: expected a list", "messages")
    found: list[tuple[str, bytes]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise CompatError(400, "bad_request", f"messages[{i}]: expected an object", "messages")
        images = _images(message.get("images"), f"messages[{i}].images")
        if images and message.get("role") == "user":
            found = images  # a later message with images replaces the earlier ones
    return found


async def _ndjson(objects: list[dict[str, Any]]) -> AsyncIterator[str]:
    for item in objects:
        yield json.dumps(item, ensure_ascii=False) + "\n"
