"""What the OpenAI- and Ollama-compatible routes share: model ids, inline images, one answer.

Both APIs are thin adapters over ``CaptionService``: they pull the images out of a chat-shaped
request, caption them through the same micro-batcher, limits and errors as ``/v1/captions``, and
answer with one text. The prompt never steers the captioner (it writes captions, it does not
follow instructions); answers say so in the ``X-Edgecap-Prompt: ignored`` header.

Several images in one request are captioned as one batch and answered with their distinct
captions, in image order, one a line; for one image the text is exactly the CLI's caption.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from ..options import GENERATION_NAMES
from ..results import CaptionResult
from .bodies import Rejected, read_body

if TYPE_CHECKING:  # the server mounts these routes: no import back at run time
    from .app import CaptionService

MODEL_ID = "edgecap"
LATEST_TAG = "latest"  # Ollama names a model without a tag NAME:latest
PROMPT_HEADER = {"X-Edgecap-Prompt": "ignored"}
JOIN = "\n"  # between the distinct captions of several images


class CompatError(Exception):
    """A request the compatible APIs refuse; each API renders it in its own error shape.

    Args:
        status: HTTP status (4xx).
        kind: a short machine-readable code (``unsupported_option``, ``remote_image``, ...).
        message: what is wrong, naming the field.
        param: the request field at fault, when there is one.
    """

    def __init__(self, status: int, kind: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.param = status, kind, message, param
        self.headers: dict[str, str] = {}
        self.counted = False  # already in the service's error metrics

    def count(self, service: CaptionService) -> None:
        """Count the refusal in the service's metrics, once."""
        if not self.counted:
            service.count_refusal(self.status, self.kind)
            self.counted = True


def from_rejected(rejected: Rejected) -> CompatError:
    """The service's own refusal (limits, bad images, overload) as a ``CompatError``."""
    error = CompatError(rejected.status, rejected.kind, rejected.detail)
    if "retry-after" in rejected.response.headers:
        error.headers["Retry-After"] = rejected.response.headers["retry-after"]
    error.counted = True  # service.reject counted it
    return error


def loaded(service: CaptionService):
    """The service's ``Manifest`` once the model is loaded.

    Raises:
        CompatError: 503 while the model loads.
    """
    if service.captioner is None:
        error = CompatError(503, "not_ready", "model is loading")
        error.headers["Retry-After"] = "1"
        raise error
    return service.captioner.manifest


def model_created(service: CaptionService) -> float:
    """When the loaded model was written (its manifest's modification time), in epoch seconds."""
    return (service.captioner.model_dir / "manifest.json").stat().st_mtime


def model_ids(styles: Iterable[str]) -> list[str]:
    """The ids a client may ask for: ``edgecap``, and ``edgecap:STYLE`` per caption style."""
    return [MODEL_ID, *(f"{MODEL_ID}:{style}" for style in styles)]


def style_of(model: Any, styles: Iterable[str]) -> str | None:
    """The caption style a requested model id names (None: the model's default).

    Raises:
        CompatError: 400 without a model name, 404 for a model this server does not serve.
    """
    styles = tuple(styles)
    if not isinstance(model, str) or not model:
        raise CompatError(400, "bad_request", f"model: name one of {', '.join(model_ids(styles))}",
                          "model")
    name, _, tag = model.partition(":")
    if name == MODEL_ID and tag in ("", LATEST_TAG):
        return None
    if name == MODEL_ID and tag in styles:
        return tag
    served = ", ".join(model_ids(styles))
    raise CompatError(404, "model_not_found",
                      f"model {model!r} not found; this server serves: {served}", "model")


def inline_image(reference: Any, where: str) -> bytes:
    """The bytes of an image sent inline: a ``data:`` URL with base64, or bare base64.

    Remote URLs are refused, never fetched, so the server cannot be made to reach other hosts.

    Raises:
        CompatError: 400 for a URL, a data URL that is not base64, or malformed base64.
    """
    if not isinstance(reference, str):
        raise CompatError(400, "bad_image", f"{where}: expected a string", where)
    text = reference.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise CompatError(400, "bad_image",
                              f"{where}: only base64 data URLs are accepted "
                              "(data:image/jpeg;base64,...)", where)
    elif "://" in text[:16]:
        raise CompatError(400, "remote_image",
                          f"{where}: image URLs are not fetched; send the image inline as a "
                          "data:image/...;base64 URL", where)
    try:
        # Line breaks are common in base64 from files; anything else outside the alphabet is not.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise CompatError(400, "bad_base64", f"{where}: not valid base64", where) from None


async def read_json(service: CaptionService, request: Request) -> dict[str, Any]:
    """The request's JSON object, read under the service's body size and time limits.

    Raises:
        CompatError: 408 slow body, 413 too large, 400 not a JSON object.
    """
    settings = service.settings
    try:
        body = await read_body(request, settings.max_body_bytes, settings.timeout_s)
    except asyncio.TimeoutError:
        raise CompatError(408, "body_timeout",
                          f"body not received within {settings.timeout_s} s") from None
    if body is None:
        raise CompatError(413, "too_large", f"body exceeds {settings.max_body_bytes} bytes")
    try:
        payload = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CompatError(400, "bad_request", f"body is not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise CompatError(400, "bad_request", "body must be a JSON object")
    return payload


def native_options(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields named like edgecap's own generation options (``num_beams``, ``style``, ...)."""
    return {name: fields[name] for name in GENERATION_NAMES if fields.get(name) is not None}


@dataclass
class Answer:
    """One request's captions as one reply: the text and what the APIs report about it."""

    text: str
    results: list[CaptionResult]
    finish_reason: str  # "stop": every caption ended; "length": one reached its token cap
    prompt_tokens: int  # image positions the decoder attended to (the text prompt is unused)
    completion_tokens: int  # caption tokens generated, every image counted
    encode_ns: int  # preprocessing and encoder time of the slowest batch
    decode_ns: int  # decoder time of the slowest batch
    started_ns: int  # time.perf_counter_ns() when the request arrived

    def records(self) -> list[dict[str, Any]]:
        """Each image's result record (the same record ``/v1/captions`` answers)."""
        return [result.to_record() for result in self.results]


async def describe(service: CaptionService, request: Request,
                   images: list[tuple[str, bytes]], fields: Mapping[str, Any],
                   style: str | None, cap_new_tokens: int | None, started_ns: int) -> Answer:
    """Caption ``images`` as one batch and join them into one ``Answer``.

    Args:
        request: the HTTP request (its client's share of the model is held while captioning).
        images: (name, bytes) in the order the client sent them.
        fields: edgecap generation options named by the client (see ``native_options``).
        style: the caption style the model id named; a ``style`` field overrides it.
        cap_new_tokens: the client's token budget (``max_tokens``, ``num_predict``), if any.

    Raises:
        CompatError: every refusal of the shared path (options, limits, images, overload).
    """
    fields = {"style": style, **fields} if style is not None else dict(fields)
    try:
        options = service.generation_options(fields, cap_new_tokens)
        results = await service.caption_uploads(images, options, request)
    except Rejected as rejected:
        raise from_rejected(rejected) from None
    service.count_success(started_ns / 1e9)
    manifest = service.captioner.manifest
    positions = manifest.prefix_length or manifest.encoder_seq_len
    capped = any(len(r.token_ids) >= options.max_new_tokens for r in results)
    return Answer(
        text=JOIN.join(dict.fromkeys(r.text for r in results if r.text)),
        results=results, finish_reason="length" if capped else "stop",
        prompt_tokens=positions * len(results),
        completion_tokens=sum(len(r.token_ids) for r in results),
        encode_ns=_slowest_ns(results, "preprocess_ms", "encoder_ms"),
        decode_ns=_slowest_ns(results, "decoder_ms"), started_ns=started_ns)


def _slowest_ns(results: list[CaptionResult], *keys: str) -> int:
    # Images of one request may land in different micro-batches; report the slowest one.
    return max((int(sum(r.timings.get(k, 0.0) for k in keys) * 1e6) for r in results), default=0)


def now_ns() -> int:
    """``time.perf_counter_ns()``: the clock request durations are measured with."""
    return time.perf_counter_ns()
