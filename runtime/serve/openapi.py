"""The OpenAPI document of ``edgecap serve``; the option fields come from ``edgecap.options``."""

from __future__ import annotations

from typing import Any

from .openapi_compat import COMPAT_PATHS
from ..archive import SearchQuery
from ..options import openapi_form_properties, openapi_parameters
from ..results import record_keys


def openapi_document(archive: bool = False, api_keys: bool = False,
                     metrics_auth: bool = False) -> dict[str, Any]:
    """The OpenAPI description; the option fields come from ``edgecap.options``.

    With ``api_keys``, the operations that need the key say so (``/metrics`` too with
    ``metrics_auth``), and the demo page reads it to ask for one.
    """
    image = {"type": "string", "format": "binary"}
    form = {"type": "object", "properties": {
        "image": {"type": "array", "items": image}, **_openapi30(openapi_form_properties())}}
    paths = {"/v1/captions": {"post": _captions_operation(image, form)}, **HEALTH_PATHS,
             **COMPAT_PATHS}
    if archive:
        paths.update(ARCHIVE_PATHS)
    document = {"openapi": "3.0.3",
                "info": {"title": "edgecap", "version": "1",
                         "description": "Image captioning service"},
                "paths": paths}
    if api_keys:  # the demo page reads this to ask for a key
        document["components"] = {"securitySchemes": {"apiKey": {"type": "http",
                                                                 "scheme": "bearer"}}}
        keyed = ("/metrics",) if metrics_auth else ()
        document["paths"] = {path: {method: _keyed(op) for method, op in ops.items()}
                             if path.startswith(("/v1/", "/api/")) or path in keyed else ops
                             for path, ops in paths.items()}
    return document


def _keyed(operation: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``operation`` that needs the API key (the module's path tables stay as they are)."""
    responses = {**operation["responses"], "401": {"description": "missing or wrong API key"}}
    return {**operation, "security": [{"apiKey": []}], "responses": responses}


def _openapi30(schema: Any) -> Any:
    """``schema`` with JSON Schema's numeric ``exclusiveMinimum: X`` (how edgecap.options states
    it) spelled as OpenAPI 3.0 wants: ``minimum: X, exclusiveMinimum: true``."""
    if isinstance(schema, list):
        return [_openapi30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: _openapi30(value) for key, value in schema.items()}
    bound = converted.get("exclusiveMinimum")
    if isinstance(bound, (int, float)) and not isinstance(bound, bool):
        converted.update(minimum=bound, exclusiveMinimum=True)
    return converted


def _captions_operation(image: dict, form: dict) -> dict[str, Any]:
    return {
        "summary": "Caption one image (raw body) or several (multipart 'image' files)",
        "parameters": _openapi30(openapi_parameters()),
        "requestBody": {"content": {"image/*": {"schema": image},
                                    "multipart/form-data": {"schema": form}}},
        "responses": {
            "200": {"description": f"one record ({', '.join(record_keys('ok'))}), "
                                   "or {results: [...]}"},
            "400": {"description": "bad request or options"},
            "408": {"description": "body not received within the timeout"},
            "413": {"description": "body too large"},
            "422": {"description": "image cannot be decoded (reason given)"},
            "503": {"description": "overloaded or loading; retry after Retry-After seconds"},
            "504": {"description": "timed out"},
        },
    }


HEALTH_PATHS = {
    "/healthz": {"get": {"summary": "liveness", "responses": {"200": {"description": "live"}}}},
    "/readyz": {"get": {"summary": "model loaded and warm", "responses": {
        "200": {"description": "ready"}, "503": {"description": "loading"}}}},
    "/metrics": {"get": {"summary": "Prometheus metrics",
                         "responses": {"200": {"description": "text"}}}},
}

ARCHIVE_PATHS = {
    "/v1/events": {"get": {
        "summary": "Search archived captions (SQLite FTS5 syntax); hits of one camera merge into "
                   "events unless frames=true",
        "parameters": SearchQuery.openapi_parameters(),
        "responses": {"200": {"description": "{query, events: [...]} or {query, hits: [...]}"},
                      "400": {"description": "malformed query or parameter (detail says which)"}},
    }},
    "/v1/snapshots/{id}": {"get": {
        "summary": "The JPEG snapshot of an archived caption, by caption id",
        "parameters": [{"name": "id", "in": "path", "required": True,
                        "schema": {"type": "integer", "minimum": 1}}],
        "responses": {"200": {"description": "image/jpeg"}, "404": {"description": "no such snapshot"}},
    }},
}
