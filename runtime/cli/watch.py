"""``edgecap watch``: one source, or many cameras from a ``--config`` file, to JSON lines,
subtitles, the archive, alerts and metrics. I/O around ``watch`` and ``watch_cameras``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import EdgecapError
from ..options import generation_from_args, runtime_from_args
from ..watch.options import WatchOptions


def run_watch(args: argparse.Namespace) -> int:
    """``edgecap watch SOURCE`` or ``edgecap watch --config FILE``: returns the exit code."""
    if (args.source is None) == (args.config is None):
        print("edgecap: error: give a SOURCE or --config FILE (not both)", file=sys.stderr)
        return 2
    if args.config is None and (args.lanes or 1) > 1:  # one source: one frame at a time
        print("edgecap: error: --lanes takes --config (several cameras)", file=sys.stderr)
        return 2
    if args.config is None and (args.snapshots or args.keep_days or args.max_disk_mb) \
            and not args.archive:
        print("edgecap: error: --snapshots, --keep-days and --max-disk-mb need --archive",
              file=sys.stderr)
        return 1
    return run_one(args) if args.config is None else run_cameras(args)


def run_one(args: argparse.Namespace) -> int:
    from ..captioner import Captioner
    from ..watch.stream import watch

    source = _open_source(args)
    captioner = Captioner(args.model, **runtime_from_args(args))
    generation = generation_from_args(args)
    captioner.options(**generation)  # fail on bad options before any writer opens a file
    options = WatchOptions.from_values(vars(args), args.camera or _default_camera(args.source))
    outputs = open_outputs(args, options.camera)
    if outputs is None:
        return 1
    stop = threading.Event()
    count = 0
    with _stopped_by_signals(stop):
        try:
            for record in watch(source, captioner, options, stop, **generation):
                for writer in outputs:
                    writer.add(record)
                count += 1
        finally:
            for writer in outputs:
                writer.close()
            stats = source.stats
            print(f"edgecap: {count} captions, {_stats_text(stats)}", file=sys.stderr)
    return 1 if stats.read_errors else 0  # a file that could not be read to its end


def run_cameras(args: argparse.Namespace) -> int:
    """Every camera of the config file through one shared model and its inference lanes."""
    from ..watch.config import load_config
    from ..captioner import Captioner
    from ..sessions import default_threads
    from ..watch.cameras import watch_cameras
    from ..watch.lanes import LaneStats, plan_lanes

    config = load_config(args.config)
    plan = plan_lanes(args.lanes or config.lanes, args.threads or default_threads(),
                      len(config.cameras))
    # One set of sessions for every lane, with the threads the lanes' own do not use.
    captioner = Captioner(args.model, **{**runtime_from_args(args), "cpu_threads": plan.threads})
    stop, ready, lanes = threading.Event(), threading.Event(), LaneStats(plan.lanes)
    feeds = [_camera_feed(camera, args, captioner, stop, ready) for camera in config.cameras]
    outputs = _camera_outputs(args, config, feeds, lanes)
    if outputs is None:
        for feed in feeds:
            feed.source.stop()
        return 1
    counts = {camera.name: 0 for camera in config.cameras}
    with _stopped_by_signals(stop):
        try:
            for record in watch_cameras(feeds, captioner, stop, ready, lanes=plan.lanes,
                                        stats=lanes):
                for writer in outputs:
                    writer.add(record)
                counts[record.camera] += 1
        finally:
            for writer in outputs:
                writer.close()
            for feed in feeds:
                print(f"edgecap: {feed.options.camera}: {counts[feed.options.camera]} captions, "
                      f"{_stats_text(feed.source.stats)}", file=sys.stderr)
            print(f"edgecap: {plan}: {lanes.summary()}", file=sys.stderr)
    return 1 if any(feed.source.stats.read_errors for feed in feeds) else 0


def _camera_feed(camera, args: argparse.Namespace, captioner, stop, ready):
    from ..watch.stream import CameraFeed, frame_size

    merged = camera.args(args)  # the command line with this camera's source, name and options
    generation = captioner.options(**generation_from_args(merged))
    return CameraFeed(_open_source(merged, frame_size(captioner)),
                      WatchOptions.from_values(vars(merged), merged.camera), generation, stop, ready)


def _open_source(args: argparse.Namespace, reduce_to: tuple[int, int] | None = None):
    """The watched source; ``watch`` sets ``reduce_to`` itself, the cameras path passes it."""
    from ..watch.sources import open_source

    if Path(args.source).is_dir():
        return open_source(args.source, reduce_to=reduce_to)
    return open_source(args.source, reduce_to=reduce_to, timeout_s=args.timeout_s)


def _default_camera(source: str) -> str:
    from ..archive.writer import default_camera

    return default_camera(source)


def _stats_text(stats) -> str:
    return (f"{stats.corrupt} corrupt frames skipped, {stats.damaged_packets} damaged packets, "
            f"{stats.reconnects} reconnects"
            + (f", read failed part way ({stats.read_errors}x)" if stats.read_errors else ""))


@contextmanager
def _stopped_by_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop`` (the run flushes and ends); restored afterwards."""
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def open_outputs(args: argparse.Namespace, camera: str, extra: tuple = ()) -> list | None:
    """Every output watch writes, the archive first (a record is committed there before any
    other output shows it); None after a one-line error, with what was opened closed again.
    ``extra``: callables that open more outputs (alerts, metrics), after the files."""
    from ..caption_io import JsonlWriter
    from ..watch.stream import SubtitleWriter

    outputs: list = []
    path = args.archive
    try:
        if args.archive:
            from ..archive.writer import ArchiveWriter, Retention

            outputs.append(ArchiveWriter(args.archive, camera, args.snapshots,
                                         Retention(args.keep_days, args.max_disk_mb)))
        path = args.out
        outputs.append(JsonlWriter(path, stdout=None if path else "json"))  # stdout without --out
        for path, kind in ((getattr(args, "srt", None), "srt"), (getattr(args, "vtt", None), "vtt")):
            if path:
                outputs.append(SubtitleWriter(path, kind))
        for open_output in extra:
            path = None
            outputs.append(open_output())
    except (OSError, EdgecapError) as exc:
        for writer in outputs:
            writer.close()
        if isinstance(exc, EdgecapError) or path is None:  # names its file and problem itself
            print(f"edgecap: error: {exc}", file=sys.stderr)
        else:
            print(f"edgecap: error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return None
    return outputs


def _camera_outputs(args: argparse.Namespace, config, feeds, lanes) -> list | None:
    """The config file's archive settings (the command line's win), alerts and metrics."""
    if args.srt or args.vtt:
        print("edgecap: error: --srt/--vtt take one source; with --config use the archive "
              "or --out", file=sys.stderr)
        return None
    merged = argparse.Namespace(**vars(args))
    for key in ("archive", "snapshots", "keep_days", "max_disk_mb"):
        if getattr(merged, key) is None:
            setattr(merged, key, getattr(config, key))
    extra = []
    if config.alerts or config.state_topic:
        extra.append(lambda: AlertOutput(config))
    if args.metrics_port:
        extra.append(lambda: MetricsOutput(config, feeds, args.metrics_port, lanes))
    if config.discovery:
        extra.append(lambda: DiscoveryOutput(config))
    outputs = open_outputs(merged, "", tuple(extra))
    alerts = [o for o in outputs or [] if isinstance(o, AlertOutput)]
    for metrics in (o for o in outputs or [] if isinstance(o, MetricsOutput)):
        for output in alerts:
            metrics.metrics.track_alerts(output.alerts)
    return outputs


class AlertOutput:
    """Hands each record to the alert rules; delivery happens on the alerts' own threads."""

    def __init__(self, config):
        from ..alerts.rules import Alerts

        self.alerts = Alerts.from_config(config)

    def add(self, record) -> None:
        self.alerts.offer(record.to_record())

    def close(self) -> None:
        self.alerts.close()


class DiscoveryOutput:
    """Announces the cameras and alert rules to Home Assistant (MQTT discovery); takes no
    records: the entities read the state and alert topics themselves."""

    def __init__(self, config):
        from ..watch.ha_discovery import Discovery

        self.discovery = Discovery(config)

    def add(self, record) -> None:
        pass

    def close(self) -> None:
        self.discovery.close()


class MetricsOutput:
    """Per-camera and per-lane Prometheus counters, served on 127.0.0.1:PORT/metrics."""

    def __init__(self, config, feeds, port: int, lanes):
        from ..watch.metrics import CameraMetrics, start_metrics_server

        self.feeds = feeds
        self.metrics = CameraMetrics([camera.name for camera in config.cameras])
        self.metrics.track_lanes(lanes)
        self.reconnects = {feed.options.camera: 0 for feed in feeds}
        self.server = start_metrics_server(self.metrics, port)

    def add(self, record) -> None:
        self.metrics.caption(record.camera, record.dropped)
        for feed in self.feeds:  # reconnects happen on reader threads: catch up on each caption
            name, now = feed.options.camera, feed.source.stats.reconnects
            for _ in range(now - self.reconnects[name]):
                self.metrics.reconnect(name)
            self.reconnects[name] = now

    def close(self) -> None:
        server = self.server[0] if isinstance(self.server, tuple) else self.server
        if hasattr(server, "shutdown"):
            server.shutdown()
