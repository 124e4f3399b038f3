"""``edgecap serve`` limits against abuse: a per-client rate limit and a request-header timeout.

- **Rate limit**: a token bucket per client address (uvicorn puts the address of the peer, or
  the ``X-Forwarded-For`` client when the peer is a proxy named by ``--forwarded-allow-ips``, in
  ``scope["client"]``).
  The table of buckets is bounded: past ``max_clients`` the least recently seen client is
  forgotten, so a flood of source addresses costs a fixed amount of memory.
- **Header timeout** (slowloris): uvicorn's h11 protocol has a keep-alive timeout, armed only
  after a response, and no timeout on request headers, so a client that sends one header byte a
  second holds its connection forever. ``HeaderTimeoutH11`` closes a connection whose request
  headers are not complete ``header_timeout_s`` after it opened or after its previous response.
- **Connections per client**: one address may hold at most ``per_client_connections`` open
  connections (trusted proxies excepted); more are closed at once, so one client's half-open
  connections cannot use up ``--max-connections`` for everybody.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_CLIENTS = 4096  # buckets kept; each is a few hundred bytes


class RateLimiter:
    """Token buckets per client: ``rate`` requests a second on average, up to ``burst`` at once.

    Args:
        rate: tokens added a second (> 0).
        burst: bucket size: how many requests a client that was idle may send at once (>= 1).
        max_clients: buckets kept before the least recently seen client is forgotten.
        clock: seconds, monotonic (a parameter so tests need not sleep).
    """

    def __init__(self, rate: float, burst: int, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.max_clients, self.clock = rate, float(burst), max_clients, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (tokens, when)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """Spend one token of ``client``: 0.0 if allowed, else the seconds until one is back."""
        now = self.clock()
        tokens, then = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens - 1.0 if wait == 0.0 else tokens, now)  # most recent last
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


def retry_after(wait_s: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(wait_s)))


def header_timeout_protocol(header_timeout_s: float, per_client_connections: int = 2**31,
                            trusted: frozenset[str] = frozenset()) -> type[H11Protocol]:
    """uvicorn's h11 protocol class, with request headers bounded by ``header_timeout_s`` and
    each address (but the ``trusted`` proxies) held to ``per_client_connections``."""
    return type("HeaderTimeoutH11", (HeaderTimeoutH11,), {
        "header_timeout_s": header_timeout_s, "per_client_connections": per_client_connections,
        "trusted": trusted, "open_by_client": Counter()})  # one table per server


class HeaderTimeoutH11(H11Protocol):
    """``H11Protocol`` that drops a connection whose request headers take too long."""

    header_timeout_s: float = 10.0
    per_client_connections: int = 2**31
    trusted: frozenset[str] = frozenset()
    open_by_client: Counter[str] = Counter()

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._peer = self.client[0] if self.client else ""
        if self._peer in self.trusted:
            self._peer = ""  # a proxy carries many clients: not counted
        if self._peer:
            self.open_by_client[self._peer] += 1
            if self.open_by_client[self._peer] > self.per_client_connections:
                transport.close()  # connection_lost follows and gives the count back
                return
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        if self._peer:
            self.open_by_client[self._peer] -= 1
            if self.open_by_client[self._peer] <= 0:
                del self.open_by_client[self._peer]
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _header_deadline(self) -> None:
        # h11 leaves the client's state IDLE until the whole header block has arrived; once a
        # request is being read or answered, the body timeout and the request timeout apply.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
