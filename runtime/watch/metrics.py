"""Prometheus metrics of ``edgecap watch --config``: per camera and lane, on their own registry.

The scheduler counts captions, dropped frames and reconnects as they happen; alert and lane
counts are read from ``Alerts.stats()`` and ``LaneStats`` when Prometheus scrapes, so neither
the alert workers nor the lanes ever touch metrics.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

AlertStatsSource = Callable[[], Mapping[str, Mapping[str, Mapping[str, int]]]]


class _AlertCollector(Collector):
    """Alert counts per camera and target, read from ``Alerts.stats()`` at scrape time."""

    def __init__(self, stats: AlertStatsSource):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        families = {
            "sent": CounterMetricFamily("edgecap_alerts_sent_total", "Alerts delivered",
                                        labels=["camera", "target"]),
            "dropped": CounterMetricFamily("edgecap_alerts_dropped_total", "Alerts dropped: "
                                           "queue full, or undelivered at exit",
                                           labels=["camera", "target"]),
            "failed": CounterMetricFamily("edgecap_alerts_failed_total", "Alerts whose delivery "
                                          "failed after its retries", labels=["camera", "target"]),
            "queued": GaugeMetricFamily("edgecap_alerts_queued", "Alerts waiting for delivery",
                                        labels=["camera", "target"]),
        }
        for camera, targets in self._stats().items():
            for target, counts in targets.items():
                for name, family in families.items():
                    family.add_metric([camera, target], counts.get(name, 0))
        yield from families.values()


class _LaneCollector(Collector):
    """Captions and busy seconds per inference lane, read from ``LaneStats`` at scrape time."""

    def __init__(self, stats: Any):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        captions = CounterMetricFamily("edgecap_lane_captions_total", "Captions made by each "
                                       "inference lane", labels=["lane"])
        busy = CounterMetricFamily("edgecap_lane_busy_seconds_total", "Seconds each inference "
                                   "lane spent captioning", labels=["lane"])
        for index, lane in enumerate(self._stats.snapshot()):
            captions.add_metric([str(index)], lane["captions"])
            busy.add_metric([str(index)], lane["busy_s"])
        yield from (captions, busy)


class CameraMetrics:
    """Per-camera counters for the multi-camera watcher.

    Args:
        cameras: names to show from the start (at zero), so dashboards see every camera.
    """

    def __init__(self, cameras: tuple[str, ...] | list[str] = ()):
        self.registry = CollectorRegistry()
        self.captions = Counter("edgecap_captions_total", "Captions produced", ["camera"],
                                registry=self.registry)
        self.frames_dropped = Counter("edgecap_frames_dropped_total", "Frames dropped as stale "
                                      "before they were captioned", ["camera"],
                                      registry=self.registry)
        self.reconnects = Counter("edgecap_reconnects_total", "Times a camera's source was "
                                  "reopened after it failed", ["camera"], registry=self.registry)
        for camera in cameras:
            for counter in (self.captions, self.frames_dropped, self.reconnects):
                counter.labels(camera=camera)

    def caption(self, camera: str, dropped: int = 0) -> None:
        """Count one caption of ``camera`` and the stale frames dropped before it."""
        self.captions.labels(camera=camera).inc()
        if dropped:
            self.frames_dropped.labels(camera=camera).inc(dropped)

    def reconnect(self, camera: str) -> None:
        """Count one reopening of ``camera``'s source."""
        self.reconnects.labels(camera=camera).inc()

    def track_lanes(self, stats: Any) -> None:
        """Expose ``stats`` (an ``edgecap.watch.lanes.LaneStats``) as the per-lane metrics."""
        self.registry.register(_LaneCollector(stats))

    def track_alerts(self, alerts: Any) -> None:
        """Expose ``alerts.stats()`` (an ``edgecap.alerts.Alerts``) as the alert metrics."""
        self.registry.register(_AlertCollector(alerts.stats))


def start_metrics_server(metrics: CameraMetrics, port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``metrics`` for Prometheus on http://HOST:PORT/metrics (a daemon thread).

    On a loopback address only requests for a loopback name (``Host: 127.0.0.1``,
    ``localhost``, ``[::1]``) are answered, 421 otherwise, as ``edgecap serve`` does: a web
    page that rebinds its own name to 127.0.0.1 cannot read the camera names.

    Returns:
        (the WSGI server, whose ``.shutdown()`` stops it, and its thread), as prometheus_client's
        ``start_http_server`` returns them.

    Raises:
        OSError: the port cannot be bound (in use, or not allowed).
    """
    app = make_wsgi_app(metrics.registry)
    if host in LOOPBACK_NAMES or host.startswith("127."):
        app = _host_checked(app, frozenset(LOOPBACK_NAMES) | {host})
    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="edgecap-metrics", daemon=True)
    thread.start()
    return server, thread


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # one line a scrape would flood stderr


def _host_checked(app: Callable, allowed: frozenset[str]) -> Callable:
    """``app`` answering 421 to a request whose Host is not one of ``allowed``."""

    def checked(environ: dict, start_response: Callable) -> Any:
        host = environ.get("HTTP_HOST", "").strip().lower()
        match = re.fullmatch(r"\[([^\]]*)\](?::\d*)?|([^:]*)(?::\d*)?", host)
        if not match or (match.group(1) or match.group(2) or "") not in allowed:
            start_response("421 Misdirected Request", [("Content-Type", "text/plain")])
            return [b"unknown Host: this metrics endpoint answers loopback names only\n"]
        return app(environ, start_response)

    return checked
