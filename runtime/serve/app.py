"""``edgecap serve``: an HTTP captioning service over one ``Captioner`` (extra ``[serve]``).

Starlette on uvicorn. Requests decode their image in a worker thread, then wait on a bounded
micro-batching queue served by one inference thread. A full queue answers 503 + Retry-After at
once; bad images answer 4xx with the reason; SIGTERM stops accepting, finishes every accepted
request, then exits (uvicorn's graceful shutdown, then the queue is drained). The rate limit, API
keys, Host and Origin checks and security headers are one ASGI layer in front of every route
(serve_security); CORS, when asked for, is Starlette's middleware in front of that; slow request
headers are cut off in uvicorn's protocol (serve_limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .batcher import MicroBatcher, Overloaded
from ..captioner import Captioner
from ..decode_guard import BudgetExceeded, DecodeGate, check_request_pixels, decode_for_model
from ..errors import ImageError, OptionsError
from .openapi import openapi_document
from ..options import REQUEST_RUNTIME, generation_from_fields, options_from_fields
from .fairness import CostShares, request_cost
from .bodies import Rejected, read_body
from .security import Guard, Policy, SecurityConfigError, page_csp
from .settings import Settings

DEMO_PAGE = (Path(__file__).parent / "demo.html")


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("edgecap_requests_total", "Caption requests by outcome",
                                ["status"], registry=self.registry)
        self.errors = Counter("edgecap_errors_total", "Failed requests by kind", ["kind"],
                              registry=self.registry)
        self.queue_depth = Gauge("edgecap_queue_depth", "Images waiting for the model",
                                 registry=self.registry)
        self.batch_size = Histogram("edgecap_batch_size", "Images captioned together",
                                    buckets=[b for b in (1, 2, 4, 8, 16, 32) if b <= max_batch] or [1],
                                    registry=self.registry)
        self.latency = Histogram("edgecap_request_duration_seconds", "Request latency",
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)


def error(status: int, kind: str, message: str, metrics: Metrics, headers=None) -> JSONResponse:
    metrics.errors.labels(kind).inc()
    metrics.requests.labels(str(status)).inc()
    return JSONResponse({"error": kind, "detail": message}, status_code=status, headers=headers)


class CaptionService:
    """The service's state and handlers: one Captioner behind one MicroBatcher."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics(settings.max_batch)
        self.ready = False
        self.captioner: Captioner | None = None
        self.batcher: MicroBatcher | None = None
        self.archive = None  # ArchiveRoutes with --archive
        self.demo_page = DEMO_PAGE.read_text()
        self.demo_csp = page_csp(self.demo_page)  # only the page's own inline script and style
        self.decode_gate = DecodeGate(settings.decode_pixels)
        self.shares = CostShares(settings.max_client_cost)

    def reject(self, status: int, kind: str, message: str, headers=None) -> Rejected:
        return Rejected(status, kind, message, error(status, kind, message, self.metrics, headers))

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        settings = self.settings
        captioner = await run_in_threadpool(
            Captioner, settings.model, device=settings.device, cpu_threads=settings.cpu_threads,
            precision=settings.precision, engine_cache=settings.engine_cache,
            io_binding=settings.io_binding)
        captioner.options(**settings.generation)  # bad service defaults fail at start
        await run_in_threadpool(captioner.caption, Image.new("RGB", (64, 64), (127, 127, 127)))
        self.captioner = captioner
        self.batcher = MicroBatcher(captioner, max_batch=settings.max_batch,
                                    max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                                    on_batch=self.metrics.batch_size.observe)
        self.ready = True
        yield
        self.ready = False
        await run_in_threadpool(self.batcher.stop)
        if self.archive is not None:
            self.archive.close()

    async def captions(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            params, uploads = await self._read_request(request)
            options = self.generation_options(params)
            results = await self.caption_uploads(uploads, options, request,
                                                 self.exact_preprocessing(params))
        except Rejected as rejected:
            return rejected.response
        self.count_success(started)
        payload = [result.to_record() for result in results]
        return JSONResponse(payload[0] if len(payload) == 1 else {"results": payload})

    def generation_options(self, fields: dict[str, Any], cap_new_tokens: int | None = None):
        """The options for one request: the service's defaults, overridden by option ``fields``.

        ``cap_new_tokens`` lowers ``max_new_tokens`` to at most it (a client's token budget).

        Raises:
            Rejected: 503 while the model loads; 400 for options that do not parse.
        """
        if not self.ready:
            raise self.reject(503, "not_ready", "model is loading", {"Retry-After": "1"})
        try:
            values = {**self.settings.generation, **generation_from_fields(fields)}
            options = self.captioner.options(**values)
            if cap_new_tokens is not None and cap_new_tokens < options.max_new_tokens:
                min_new = min(options.min_new_tokens, cap_new_tokens)
                options = self.captioner.options(**{**values, "max_new_tokens": cap_new_tokens,
                                                    "min_new_tokens": min_new})
        except OptionsError as exc:
            raise self.reject(400, "bad_options", str(exc)) from None
        return options

    def exact_preprocessing(self, fields: dict[str, Any]) -> bool:
        """The request's ``exact_preprocessing`` field, else the service's setting.

        Raises:
            Rejected: 400 for a value that does not parse.
        """
        try:
            values = options_from_fields(fields, REQUEST_RUNTIME)
        except OptionsError as exc:
            raise self.reject(400, "bad_options", str(exc)) from None
        return values.get("exact_preprocessing", self.settings.exact_preprocessing)

    async def caption_uploads(self, uploads: list[tuple[str, bytes]], options,
                              request: Request, exact: bool | None = None) -> list:
        """Decode and caption ``[(name, image bytes)]`` through the micro-batcher, in order.

        Every route that captions goes through here, so each gets the same limits and errors.
        ``exact``: full-size decodes (None: the service's ``exact_preprocessing``).

        Raises:
            Rejected: no image or too many (400), an undecodable image (422), a full queue
                (503), no caption within the timeout (504).
        """
        if not uploads:
            raise self.reject(400, "bad_request", "no image in the request")
        if len(uploads) > self.settings.max_images:
            raise self.reject(400, "bad_request",
                              f"at most {self.settings.max_images} images per request")
        async with self._share(request, request_cost(len(uploads), options)):
            exact = self.settings.exact_preprocessing if exact is None else exact
            images = await self._decode(uploads, exact)
            return await self._caption(images, options, [name for name, _ in uploads])

    def count_success(self, started: float) -> None:
        """Metrics for a request answered with captions (``started``: its perf_counter)."""
        self.metrics.requests.labels("200").inc()
        self.metrics.latency.observe(time.perf_counter() - started)

    async def _read_request(self, request: Request) -> tuple[dict, list[tuple[str, bytes]]]:
        """(option fields, [(name, image bytes)]) from a raw-image or multipart request."""
        limit, timeout = self.settings.max_body_bytes, self.settings.timeout_s
        try:
            body = await read_body(request, limit, timeout)
        except asyncio.TimeoutError:
            raise self.reject(408, "body_timeout", f"body not received within {timeout} s") from None
        if body is None:
            raise self.reject(413, "too_large", f"body exceeds {limit} bytes")
        params = dict(request.query_params)
        uploads: list[tuple[str, bytes]] = []
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            try:
                # Few fields: a request has one per option; thousands would be parsing work.
                form = await request.form(max_files=self.settings.max_images, max_fields=64)
            except Exception as exc:  # noqa: BLE001 - malformed multipart
                raise self.reject(400, "bad_request", f"malformed multipart body ({exc})") from None
            for key, value in form.multi_items():
                if hasattr(value, "read"):
                    uploads.append((value.filename or key, await value.read()))
                else:
                    params.setdefault(key, value)
        else:
            uploads.append(("body", body))
        if not uploads:
            raise self.reject(400, "bad_request", "no image: send it as the body or a form file")
        return params, uploads

    @contextlib.asynccontextmanager
    async def _share(self, request: Request, cost: int):
        """Hold ``cost`` of this client's share of the model while the block runs."""
        client = request.client.host if request.client else ""
        if not self.shares.admit(client, cost):
            raise self.reject(429, "client_busy", f"this client already has work in flight; a "
                              f"request of {cost} units (images x beams x max_new_tokens) waits "
                              f"until it is done (share: {self.shares.per_client})",
                              {"Retry-After": "1"})
        try:
            yield
        finally:
            self.shares.release(client, cost)

    async def _decode(self, uploads: list[tuple[str, bytes]], exact: bool) -> list:
        """Decode one image at a time within the request's and the server's pixel budgets
        (counted at the scale each is decoded at: full size when ``exact``)."""
        settings, images = self.settings, []
        reduce_to = None if exact else self.captioner.decode_size  # its own setting is off
        try:
            pixels = check_request_pixels(uploads, settings.max_request_pixels, reduce_to)
        except BudgetExceeded as exc:
            raise self.reject(413, "too_many_pixels", str(exc)) from None
        preprocessing = self.captioner.manifest.preprocessing
        for (name, data), count in zip(uploads, pixels):
            try:
                async with self.decode_gate.admit(count, settings.timeout_s):
                    images.append(await run_in_threadpool(
                        decode_for_model, data, name, settings.max_image_pixels, preprocessing,
                        reduce_to))
            except asyncio.TimeoutError:
                raise self.reject(503, "decode_busy", "too many pixels being decoded; retry",
                                  {"Retry-After": "1"}) from None
            except ImageError as exc:
                raise self.reject(422 if data else 400, "bad_image",
                                  f"{name}: {exc.reason}") from None
        return images

    async def _caption(self, images: list, options, names: list[str]) -> list:
        batcher = self.batcher
        try:
            futures = [batcher.submit(image, options, name) for image, name in zip(images, names)]
        except Overloaded as exc:
            raise self.reject(503, "overloaded", str(exc), {"Retry-After": "1"}) from None
        finally:
            self.metrics.queue_depth.set(batcher.depth())
        timeout = self.settings.timeout_s
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(asyncio.wrap_future(f) for f in futures)), timeout)
        except asyncio.TimeoutError:
            raise self.reject(504, "timeout", f"no caption within {timeout} s") from None

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "live"})

    async def readyz(self, request: Request) -> Response:
        if self.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "loading"}, status_code=503)

    async def prometheus(self, request: Request) -> Response:
        if self.batcher is not None:
            self.metrics.queue_depth.set(self.batcher.depth())
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        settings = self.settings
        return JSONResponse(openapi_document(archive=self.archive is not None,
                                             api_keys=bool(settings.api_keys),
                                             metrics_auth=settings.metrics_auth))

    async def demo(self, request: Request) -> Response:
        return HTMLResponse(self.demo_page, headers={"Content-Security-Policy": self.demo_csp})

    def count_refusal(self, status: int, kind: str) -> None:
        """Metrics for a request the security layer refused before any handler ran."""
        self.metrics.errors.labels(kind).inc()
        self.metrics.requests.labels(str(status)).inc()


def create_app(settings: Settings) -> Starlette:
    """The Starlette app: ``/v1/captions``, the OpenAI- and Ollama-compatible endpoints, and
    with ``settings.archive`` the archive's search endpoints too.

    Raises:
        ArchiveError: the archive cannot be opened (before the server binds its port).
    """
    service = CaptionService(settings)
    routes = [
        Route("/v1/captions", service.captions, methods=["POST"]),
        Route("/healthz", service.healthz), Route("/readyz", service.readyz),
        Route("/metrics", service.prometheus), Route("/openapi.json", service.openapi),
        Route("/", service.demo),
    ]
    # Imported here: the compatible APIs build on this module's service.
    from .compat_ollama import OllamaRoutes
    from .compat_openai import OpenAIRoutes

    routes += OpenAIRoutes(service).routes() + OllamaRoutes(service).routes()
    if settings.archive is not None:
        from .archive_routes import ArchiveRoutes

        service.archive = ArchiveRoutes(settings.archive, settings.snapshots)
        routes += service.archive.routes()
    return Starlette(routes=routes, lifespan=service.lifespan,
                     middleware=_middleware(settings, service.count_refusal))


def _middleware(settings: Settings, on_reject) -> list[Middleware]:
    """CORS (only with ``cors_origins``) outermost, so preflights need no key; then the Guard."""
    policy = Policy(api_keys=settings.api_keys, allowed_hosts=settings.allowed_hosts,
                    metrics_auth=settings.metrics_auth, cors_origins=settings.cors_origins,
                    rate_limit=settings.rate_limit, rate_burst=settings.rate_burst)
    layers = [Middleware(Guard, policy=policy, on_reject=on_reject)]
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        # No cookies are used (allow_credentials stays off): the key travels in Authorization.
        layers.insert(0, Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                    allow_methods=["GET", "POST"],
                                    allow_headers=["Authorization", "Content-Type"],
                                    expose_headers=["Retry-After", "X-Edgecap-Prompt"],
                                    max_age=600))
    return layers


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the service until SIGTERM/SIGINT.

    Raises:
        ArchiveError, SecurityConfigError: bad settings, found before the port is bound.
    """
    import uvicorn

    from .limits import header_timeout_protocol

    app = create_app(settings)  # a bad model or archive fails here, before the port is bound
    tls = _tls_files(settings)
    scheme = "https" if tls else "http"
    print(f"edgecap: serving on {scheme}://{host}:{port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=int(settings.timeout_s) + 5,
                server_header=False,  # no version banner for scanners
                limit_concurrency=settings.max_connections,
                http=header_timeout_protocol(
                    settings.header_timeout_s, _client_connections(settings),
                    frozenset(settings.forwarded_allow_ips)),
                timeout_keep_alive=settings.keep_alive_s,
                # uvicorn trusts 127.0.0.1 by default: behind ssh -L or socat every client would
                # pick its own rate-limit key. Only the named proxies are believed.
                proxy_headers=bool(settings.forwarded_allow_ips),
                forwarded_allow_ips=list(settings.forwarded_allow_ips) or None, **tls)


def _client_connections(settings: Settings) -> int:
    """Open connections one address may hold: a share of the server's, never all of them."""
    if "*" in settings.forwarded_allow_ips:  # every peer a proxy: addresses tell nothing
        return settings.max_connections
    if settings.max_client_connections is not None:
        return settings.max_client_connections
    return max(1, settings.max_connections // 4)


def _tls_files(settings: Settings) -> dict[str, str]:
    """uvicorn's ssl_* arguments, after checking that the certificate and key load together."""
    if settings.tls_cert is None and settings.tls_key is None:
        return {}
    if settings.tls_cert is None or settings.tls_key is None:
        raise SecurityConfigError("TLS needs both --tls-cert and --tls-key")
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(
            f"cannot load --tls-cert {settings.tls_cert} with --tls-key {settings.tls_key} "
            f"({exc})") from None
    return {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
