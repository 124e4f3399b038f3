"""``edgecap serve`` hardening: API keys, Host and Origin checks, security headers.

One ASGI layer in front of every route, so no handler can forget it:

- **API keys** (``--api-key-file`` / ``EDGECAP_API_KEY``): every path needs
  ``Authorization: Bearer KEY`` except health probes, the OpenAPI document, the static demo page
  and (unless ``--metrics-auth``) metrics: they carry no images or captions. Keys are compared as SHA-256 digests with
  ``hmac.compare_digest``, so neither their content nor their length leaks through timing.
- **Host check** (DNS rebinding): a loopback-bound server answers only requests addressed to a
  loopback name (or an ``--allowed-host``), so a web page whose name re-resolves to 127.0.0.1
  cannot read it.
- **Origin check** (cross-site requests): without ``--cors-origin`` the service sends no CORS
  headers and its only browser client is its own demo page, so a request whose ``Origin`` is
  another site is refused before it costs any CPU (a cross-site form POST needs no preflight, and
  would otherwise be captioned). Origins given with ``--cors-origin`` pass, and get CORS headers.
- **Rate limit** (``--rate-limit``): a token bucket per client address (serve_limits), checked
  first, so guessing keys is throttled too; over it, 429 with ``Retry-After``.
- **Headers**: ``nosniff``, no referrer, no framing; API answers are ``no-store`` unless the route
  chose its own caching (snapshots).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgecapError
from ..secret_files import warn_if_readable
from .limits import RateLimiter, retry_after

API_KEY_ENV = "EDGECAP_API_KEY"
MIN_KEY_CHARS = 16  # shorter keys are guessable online; `openssl rand -hex 32` gives 64
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
OPEN_PATHS = ("/", "/healthz", "/readyz", "/metrics", "/openapi.json")
PROBE_PATHS = ("/healthz", "/readyz")  # never rate limited: an orchestrator polls them
API_PREFIXES = ("/v1/", "/api/")  # edgecap's own and OpenAI's paths, and Ollama's

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class SecurityConfigError(EdgecapError):
    """An API key file or TLS setting that cannot be used; raised before the port is bound."""


def load_api_keys(path: Path | None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Keys from ``path`` (one a line, ``#`` comments) and the ``EDGECAP_API_KEY`` variable.

    Raises:
        SecurityConfigError: the file cannot be read, holds no key, or a key is too short or
            contains whitespace.
    """
    environ = os.environ if environ is None else environ
    keys: list[tuple[str, str]] = []  # (where it came from, key)
    if environ.get(API_KEY_ENV):
        keys.append((API_KEY_ENV, environ[API_KEY_ENV].strip()))
    if path is not None:
        keys += _read_key_file(path)
    for where, key in keys:
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise SecurityConfigError(
                f"{where}: an API key must be at least {MIN_KEY_CHARS} characters without spaces "
                "(make one with: openssl rand -hex 32)")
    return tuple(dict.fromkeys(key for _, key in keys))


def _read_key_file(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityConfigError(f"{path}: cannot read API key file ({exc})") from None
    lines = [(f"{path}:{n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    keys = [(where, line) for where, line in lines if line and not line.startswith("#")]
    if not keys:
        raise SecurityConfigError(f"{path}: no API key in the file (one key a line)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):  # a warning: containers mount secrets group-readable
        warn_if_readable(path, "API key file")
    return keys


def is_loopback(host: str) -> bool:
    """True for a host that only this machine can reach."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


@dataclass(frozen=True)
class Policy:
    """What the guard enforces: ``allowed_hosts`` None means any Host header."""

    api_keys: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] | None = None
    metrics_auth: bool = False  # /metrics needs the key too
    cors_origins: tuple[str, ...] = ()  # origins (scheme://host[:port]) allowed cross-site
    rate_limit: float = 0.0  # requests a second per client; 0: no limit
    rate_burst: int = 1

    def key_digests(self) -> tuple[bytes, ...]:
        return tuple(hashlib.sha256(key.encode()).digest() for key in self.api_keys)

    def open_paths(self) -> tuple[str, ...]:
        """Paths answered without a key."""
        return tuple(p for p in OPEN_PATHS if not (self.metrics_auth and p == "/metrics"))


class Guard:
    """ASGI middleware that applies a ``Policy`` to every HTTP request.

    ``on_reject(status, kind)`` is called for each refused request (the service counts them).
    """

    def __init__(self, app, policy: Policy, on_reject: Callable[[int, str], None] | None = None):
        self.app = app
        self.policy = policy
        self.digests = policy.key_digests()
        self.open_paths = policy.open_paths()
        self.limiter = (RateLimiter(policy.rate_limit, policy.rate_burst)
                        if policy.rate_limit > 0 else None)
        self.on_reject = on_reject or (lambda status, kind: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.check(scope)
        if refusal is not None:
            self.on_reject(refusal[0], refusal[1])
            await _send_error(send, *refusal)
            return
        await self.app(scope, receive, _with_security_headers(send, scope["path"]))

    def check(self, scope: Scope) -> tuple[int, str, str, list] | None:
        """(status, kind, detail, extra headers) for a request to refuse, else None."""
        if (wait := self._rate_limited(scope)) > 0:
            detail = "too many requests from this client; retry after Retry-After seconds"
            return 429, "rate_limited", detail, [(b"retry-after", retry_after(wait).encode())]
        headers = _headers(scope)
        host = headers.get("host", "")
        if self.policy.allowed_hosts is not None and _host_name(host) not in self.policy.allowed_hosts:
            return 421, "bad_host", f"this server does not answer for host {host!r}", []
        origin = headers.get("origin")
        if (origin is not None and not _same_origin(origin, host)
                and origin.lower().rstrip("/") not in self.policy.cors_origins):
            return 403, "cross_origin", "cross-origin requests are refused", []
        if self.digests and scope["path"] not in self.open_paths and not self._authorized(headers):
            detail = "send the API key as: Authorization: Bearer KEY"
            return 401, "unauthorized", detail, [(b"www-authenticate", b'Bearer realm="edgecap"')]
        return None

    def _rate_limited(self, scope: Scope) -> float:
        """Seconds the client must wait (0.0: go ahead); one token spent per request."""
        client = scope.get("client")
        if self.limiter is None or not client or scope["path"] in PROBE_PATHS:
            return 0.0
        return self.limiter.take(client[0])

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        digest = hashlib.sha256(key.strip().encode()).digest()
        # Every key is compared (no early exit), so timing does not tell which one was close.
        return sum(hmac.compare_digest(digest, known) for known in self.digests) > 0


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _host_name(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.com' -> 'example.com'."""
    match = re.fullmatch(r"\[([^\]]*)\](?::\d*)?|([^:]*)(?::\d*)?", host.strip().lower())
    return (match.group(1) or match.group(2) or "") if match else ""


def _same_origin(origin: str, host: str) -> bool:
    """True when ``Origin`` names the host:port the request was sent to. The scheme is not
    compared: a TLS-terminating proxy changes it, and another site differs in host or port."""
    _, sep, netloc = origin.partition("://")
    return bool(sep) and netloc.lower() == host.strip().lower()


async def _send_error(send: Send, status: int, kind: str, detail: str, extra: list) -> None:
    body = json.dumps({"error": kind, "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra, *SECURITY_HEADERS, (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


def _with_security_headers(send: Send, path: str) -> Send:
    """``send`` that adds the security headers (and no-store to API answers) to the response."""

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            names = {name.lower() for name, _ in headers}
            headers += [(k, v) for k, v in SECURITY_HEADERS if k not in names]
            if path.startswith(API_PREFIXES) and b"cache-control" not in names:
                headers.append((b"cache-control", b"no-store"))  # captions of private images
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


def page_csp(html: str) -> str:
    """A Content-Security-Policy for a page: only its own inline script and style (by hash)."""
    return (f"default-src 'none'; script-src {_inline_hashes(html, 'script')}; "
            f"style-src {_inline_hashes(html, 'style')}; img-src 'self' blob:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


def _inline_hashes(html: str, tag: str) -> str:
    """CSP sources allowing exactly the page's inline ``<tag>`` blocks ('none' if it has none)."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    digests = [base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() for b in blocks]
    return " ".join(f"'sha256-{d}'" for d in digests) or "'none'"


class UnsafeBind(SecurityConfigError):
    """A non-loopback address without API keys or an explicit --insecure-no-auth (a usage
    error); also a bad --cors-origin."""


def bind_policy(host: str, api_keys: tuple[str, ...], no_auth: bool,
                extra_hosts: list[str] | None) -> Policy:
    """The policy for serving on ``host``; refuses to expose an open service by accident.

    Raises:
        UnsafeBind: ``host`` is reachable from other machines, no key is set and ``no_auth`` is
            not given; or ``no_auth`` is given together with keys.
    """
    if no_auth and api_keys:
        raise UnsafeBind("--insecure-no-auth contradicts the API keys given (--api-key-file or "
                         f"{API_KEY_ENV})")
    if not is_loopback(host) and not api_keys and not no_auth:
        raise UnsafeBind(f"--host {host} is reachable from other machines: give --api-key-file "
                         f"(or {API_KEY_ENV}), or --insecure-no-auth if a proxy in front "
                         "authenticates")
    extra = tuple(name.lower() for name in extra_hosts or ())
    # Loopback binds answer only loopback names (DNS rebinding); others any name unless listed.
    allowed = (*LOOPBACK_HOSTS, host.lower(), *extra) if is_loopback(host) or extra else None
    return Policy(api_keys=api_keys, allowed_hosts=allowed)


def cors_origin(text: str) -> str:
    """``text`` as a CORS origin (``scheme://host[:port]``, lower case), for --cors-origin.

    Raises:
        UnsafeBind: not an http(s) origin: ``*``, a path, or no scheme.
    """
    origin = text.strip().lower().rstrip("/")
    if not re.fullmatch(r"https?://[a-z0-9.\-]+(:\d{1,5})?|https?://\[[0-9a-f:.]+\](:\d{1,5})?",
                        origin):
        raise UnsafeBind(f"--cors-origin {text!r}: expected an origin like https://dash.example:8443"
                         " (scheme, host and port only; '*' is not allowed)")
    return origin
