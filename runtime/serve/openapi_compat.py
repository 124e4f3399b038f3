"""OpenAPI paths of the OpenAI- and Ollama-compatible endpoints (``compat_openai``,
``compat_ollama``): the subset of each API's request that edgecap reads."""

from __future__ import annotations

from typing import Any

_STRING = {"type": "string"}
_BOOLEAN = {"type": "boolean"}
_BUDGET = {"type": "integer", "minimum": 1,
           "description": "a cap on the caption's tokens (never lengthens it)"}
_IGNORED = {"type": "number", "description": "accepted and ignored: decoding is deterministic"}
_IMAGE_PART = {"type": "object", "required": ["type", "image_url"], "properties": {
    "type": {"type": "string", "enum": ["image_url"]},
    "image_url": {"type": "object", "required": ["url"], "properties": {
        "url": {"type": "string", "description": "data:image/...;base64,... (URLs are refused)"},
        "detail": {"type": "string", "enum": ["low", "high", "auto"]}}}}}
_TEXT_PART = {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"type": "string", "enum": ["text"]}, "text": _STRING}}
_CHAT_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
    "content": {"oneOf": [_STRING, {"type": "array", "items": {
        "oneOf": [_STRING, _TEXT_PART, _IMAGE_PART]}}]}}}
_CHAT_REQUEST = {"type": "object", "required": ["messages"], "properties": {
    "model": _STRING, "messages": {"type": "array", "minItems": 1, "items": _CHAT_MESSAGE},
    "stream": _BOOLEAN, "stream_options": {"type": "object",
                                           "properties": {"include_usage": _BOOLEAN}},
    "max_tokens": _BUDGET, "max_completion_tokens": _BUDGET,
    "temperature": _IGNORED, "top_p": _IGNORED,
    "n": {"type": "integer", "minimum": 1, "maximum": 1}}}

_BASE64_IMAGES = {"type": "array", "items": {"type": "string", "format": "byte"}}
_OLLAMA_OPTIONS = {"type": "object", "properties": {
    "num_predict": {"type": "integer", "minimum": -2,
                    "description": "a cap on the caption's tokens; -1, -2: none"},
    "temperature": _IGNORED}}
_GENERATE_REQUEST = {"type": "object", "required": ["model"], "properties": {
    "model": _STRING, "prompt": _STRING, "images": _BASE64_IMAGES, "stream": _BOOLEAN,
    "options": _OLLAMA_OPTIONS}}
_OLLAMA_CHAT_REQUEST = {"type": "object", "required": ["model"], "properties": {
    "model": _STRING, "stream": _BOOLEAN, "options": _OLLAMA_OPTIONS,
    "messages": {"type": "array", "items": {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
        "content": _STRING, "images": _BASE64_IMAGES}}}}}

_REFUSALS = {
    "400": {"description": "malformed request, an image URL, bad base64, or an option that "
                           "cannot be honoured (named in the error)"},
    "404": {"description": "a model this server does not serve"},
    "408": {"description": "body not received within the timeout"},
    "413": {"description": "body too large"},
    "422": {"description": "image cannot be decoded (reason given)"},
    "503": {"description": "overloaded or loading; retry after Retry-After seconds"},
    "504": {"description": "timed out"},
}


def _post(summary: str, schema: dict[str, Any], answer: str) -> dict[str, Any]:
    return {"post": {"summary": summary,
                     "requestBody": {"required": True,
                                     "content": {"application/json": {"schema": schema}}},
                     "responses": {"200": {"description": answer}, **_REFUSALS}}}


def _get(summary: str, answer: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": answer}}}}


COMPAT_PATHS: dict[str, Any] = {
    "/v1/models": _get("OpenAI: the served model ids", "{object: list, data: [...]}"),
    "/v1/models/{model}": {"get": {
        "summary": "OpenAI: one served model id",
        "parameters": [{"name": "model", "in": "path", "required": True, "schema": _STRING}],
        "responses": {"200": {"description": "{id, object: model, ...}"},
                      "404": {"description": "a model this server does not serve"}}}},
    "/v1/chat/completions": _post(
        "OpenAI Chat Completions subset: caption the images of the last user message",
        _CHAT_REQUEST, "chat.completion, or server-sent chunks ending with data: [DONE]"),
    "/api/version": _get("Ollama: the server version", "{version}"),
    "/api/tags": _get("Ollama: the served models", "{models: [...]}"),
    "/api/show": _post("Ollama: details of a model", {
        "type": "object", "required": ["model"], "properties": {"model": _STRING}},
        "{details, model_info, capabilities, ...}"),
    "/api/generate": _post("Ollama generate: caption the base64 images",
                           _GENERATE_REQUEST, "NDJSON objects, or one with stream: false"),
    "/api/chat": _post("Ollama chat: caption the images of the last user message",
                       _OLLAMA_CHAT_REQUEST, "NDJSON objects, or one with stream: false"),
}
