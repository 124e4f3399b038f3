"""Where alerts go: a command, a webhook or an MQTT broker.

Each target kind is drained by its own worker thread from a bounded queue, so a slow or dead
target never blocks captioning: a full queue drops the alert, and every drop is counted (per
camera and target) and logged. paho-mqtt (the ``[alerts]`` extra) is imported only when an MQTT
target is used.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from ..secret_files import redact_url

log = logging.getLogger("edgecap.alerts")
COUNTS = ("sent", "dropped", "failed", "queued")
DROP_LOG_INTERVAL_S = 10.0  # one warning per target per interval, however many alerts drop
MAX_INFLIGHT = 20  # MQTT messages handed to paho and not yet acknowledged


class DeliveryError(Exception):
    """One delivery failed (after its retries); the worker logs it and goes on."""


@dataclass(frozen=True)
class CommandTarget:
    """Run ``argv`` (no shell) with the alert record as JSON on stdin."""

    argv: tuple[str, ...]
    timeout_s: float = 30.0  # a hung command is killed, so the next alert gets its turn
    kind: ClassVar[str] = "command"


@dataclass(frozen=True)
class WebhookTarget:
    """POST the alert record as JSON to ``url``, retrying 5xx, 429 and connection errors."""

    url: str
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold secrets
    timeout_s: float = 5.0  # per attempt
    retries: int = 3  # attempts after the first
    backoff_s: float = 1.0  # wait before the first retry; doubles each retry
    kind: ClassVar[str] = "webhook"


@dataclass(frozen=True)
class MqttBroker:
    """How to reach one broker; rules naming the same broker share one connection."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str = ""  # empty: the broker assigns one
    keepalive_s: int = 60
    tls: bool = False  # TLS with the system's CA certificates
    ca_file: str | None = None  # with tls: trust this CA bundle instead (a self-signed broker)
    reconnect_max_s: float = 30.0  # reconnect backoff starts at 1 s and doubles up to this


@dataclass(frozen=True)
class MqttTarget:
    """Publish the alert record as JSON on ``topic`` (QoS 1: the broker acknowledges it)."""

    broker: MqttBroker
    topic: str = "edgecap/alerts"
    qos: int = 1
    retain: bool = False
    kind: ClassVar[str] = "mqtt"


Target = CommandTarget | WebhookTarget | MqttTarget


@dataclass
class Delivery:
    """One alert on its way to one target."""

    target: Target
    camera: str
    body: bytes  # the JSON record


class AlertStats:
    """Counts per (camera, target kind): sent, dropped, failed, and queued right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], dict[str, int]] = {}
        self._last_drop_log: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def add(self, camera: str, kind: str, count: str, delta: int = 1) -> None:
        with self._lock:
            row = self._counts.setdefault((camera, kind), dict.fromkeys(COUNTS, 0))
            row[count] += delta

    def queue(self, delivery: Delivery) -> None:
        self.add(delivery.camera, delivery.target.kind, "queued")

    def done(self, delivery: Delivery, outcome: str) -> None:
        """A queued delivery left the queue as ``outcome`` (sent, failed or dropped)."""
        with self._lock:
            row = self._counts.setdefault((delivery.camera, delivery.target.kind),
                                          dict.fromkeys(COUNTS, 0))
            row["queued"] -= 1
            row[outcome] += 1

    def drop(self, camera: str, kind: str, why: str) -> None:
        """Count a dropped alert; log it, at most once per interval per target kind."""
        self.add(camera, kind, "dropped")
        now = time.monotonic()
        with self._lock:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            if now - self._last_drop_log.get(kind, -DROP_LOG_INTERVAL_S) < DROP_LOG_INTERVAL_S:
                return
            self._last_drop_log[kind], count = now, self._unlogged.pop(kind)
        log.warning("alerts: %d %s alert(s) dropped (%s)", count, kind, why)

    def snapshot(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{camera: {target kind: {sent, dropped, failed, queued}}}``."""
        with self._lock:
            out: dict[str, dict[str, dict[str, int]]] = {}
            for (camera, kind), row in self._counts.items():
                out.setdefault(camera, {})[kind] = dict(row)
            return out


class DeliveryQueue:
    """A bounded queue and the one worker thread that drains it."""

    def __init__(self, kind: str, deliver: Callable[[Delivery, threading.Event], None],
                 stats: AlertStats, capacity: int):
        self.kind, self._deliver, self._stats, self._capacity = kind, deliver, stats, capacity
        self._items: deque[Delivery] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.abort = threading.Event()  # set when close() runs out of time: stop retrying
        self._thread = threading.Thread(target=self._run, name=f"edgecap-alerts-{kind}",
                                        daemon=True)
        self._thread.start()

    def put(self, delivery: Delivery) -> bool:
        """Queue ``delivery``; never blocks. False (counted as dropped) when the queue is full."""
        with self._cond:
            if not self._closing and len(self._items) < self._capacity:
                self._items.append(delivery)
                self._stats.queue(delivery)  # under the lock: the worker cannot finish it first
                self._cond.notify()
                return True
        self._stats.drop(delivery.camera, self.kind, "queue full")
        return False

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items or self.abort.is_set():
                    return
                delivery = self._items.popleft()
            self._stats.done(delivery, self._attempt(delivery))

    def _attempt(self, delivery: Delivery) -> str:
        try:
            self._deliver(delivery, self.abort)
            return "sent"
        except DeliveryError as exc:
            log.warning("alerts: %s delivery failed: %s", self.kind, exc)
        except Exception:  # a bug in one target must not end the worker
            log.exception("alerts: %s delivery crashed", self.kind)
        return "failed"

    def close(self, deadline: float) -> None:
        """Deliver what is queued until ``deadline`` (monotonic); the rest is dropped."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self.abort.set()  # a retry still waiting gives up; its alert counts as failed
        with self._cond:
            leftover, self._items = list(self._items), deque()
        for delivery in leftover:
            self._stats.done(delivery, "dropped")
        if leftover:
            log.warning("alerts: %d %s alert(s) undelivered at exit", len(leftover), self.kind)


def run_command(delivery: Delivery, abort: threading.Event) -> None:
    """Run the command with the record on stdin; a non-zero exit is a failed delivery. The
    command is killed after its timeout, or at once when ``abort`` is set (closing)."""
    target = delivery.target
    assert isinstance(target, CommandTarget)
    try:
        proc = subprocess.Popen(list(target.argv), stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as exc:
        raise DeliveryError(f"{target.argv[0]}: {exc.strerror or exc}") from None
    with proc:
        stderr = _communicate(proc, delivery.body, target.timeout_s, abort)
    if stderr is None:
        raise DeliveryError(f"{target.argv[0]}: killed after {target.timeout_s:g} s"
                            if not abort.is_set() else f"{target.argv[0]}: killed at exit")
    if proc.returncode != 0:
        tail = stderr.decode(errors="replace").strip()[-300:]
        raise DeliveryError(f"{target.argv[0]}: exit status {proc.returncode}: {tail}")


def _communicate(proc: subprocess.Popen, body: bytes, timeout_s: float,
                 abort: threading.Event) -> bytes | None:
    """The command's stderr once it exits, or None when it had to be killed."""
    deadline = time.monotonic() + timeout_s
    body_or_none: bytes | None = body  # communicate() takes the input only on its first call
    while True:
        try:
            return proc.communicate(body_or_none, timeout=0.1)[1]
        except subprocess.TimeoutExpired:
            body_or_none = None
        if abort.is_set() or time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            return None


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """No redirect is followed: the webhook's headers (its credentials) would go with it to a
    host the config never named. The 3xx answer becomes an HTTPError, a failed delivery."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def post_webhook(delivery: Delivery, abort: threading.Event) -> None:
    """POST the record; retry with exponential backoff on 5xx, 429 and connection errors.
    Redirects are refused, and errors name the URL without its user info or query."""
    target = delivery.target
    assert isinstance(target, WebhookTarget)
    headers = {"Content-Type": "application/json", "User-Agent": "edgecap", **dict(target.headers)}
    where = redact_url(target.url)
    for attempt in range(target.retries + 1):
        request = urllib.request.Request(target.url, data=delivery.body, headers=headers,
                                         method="POST")
        try:
            with _OPENER.open(request, timeout=target.timeout_s) as response:
                response.read()
            return
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
            if 300 <= exc.code < 400:
                raise DeliveryError(f"{where}: {reason}: redirects are not followed (they "
                                    "would carry the webhook's headers elsewhere); configure "
                                    "the final URL") from None
            if exc.code < 500 and exc.code != 429:  # the request itself is wrong: retry won't help
                raise DeliveryError(f"{where}: {reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = type(exc).__name__ if isinstance(exc, ValueError) else \
                str(getattr(exc, "reason", exc))
        if attempt == target.retries or abort.wait(target.backoff_s * 2 ** attempt):
            break
    raise DeliveryError(f"{where}: {reason} (after {attempt + 1} attempt(s))")
