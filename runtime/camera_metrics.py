"""Prometheus metrics of ``edgecap watch --config``: per camera, on their own registry.

The scheduler counts captions, dropped frames and reconnects as they happen; alert counts are
read from ``Alerts.stats()`` when Prometheus scrapes, so the alert workers never touch metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, start_http_server
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

    def track_alerts(self, alerts: Any) -> None:
        """Expose ``alerts.stats()`` (an ``edgecap.alerts.Alerts``) as the alert metrics."""
        self.registry.register(_AlertCollector(alerts.stats))


def start_metrics_server(metrics: CameraMetrics, port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``metrics`` for Prometheus on http://HOST:PORT/metrics (a daemon thread).

    Returns:
        prometheus_client's server (``.shutdown()`` stops it) and thread, as it returns them.

    Raises:
        OSError: the port cannot be bound (in use, or not allowed).
    """
    return start_http_server(port, addr=host, registry=metrics.registry)
