"""``edgecap watch --config cameras.toml``: cameras and alert rules in one TOML file.

Read with stdlib ``tomllib``; every key is known and checked (type and bounds) before anything
starts, and every problem is one ``ConfigError`` line ``FILE:LINE: key: problem``
(``toml_table``). A ``[[camera]]`` takes the keys of ``WATCH`` and ``GENERATION``;
``[[alert]]`` and ``[mqtt]`` are read by ``alert_config``. Secrets never need to sit in the
file: ``password_env``/``password_file`` and ``headers_env``/``headers_file`` name where they
are. Relative paths are relative to the config file's folder. See docs/alerts.md.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..alerts.rules import AlertRule
from ..alerts.targets import MqttBroker
from ..options import GENERATION
from ..secret_files import warn_if_readable
from .alert_config import MQTT_KEYS, alert, broker_settings, publish_topic
from .lanes import LANES
from .options import WATCH
from .toml_table import ConfigError, ConfigSource, ConfigTable, KeyLines

__all__ = ["CameraConfig", "ConfigError", "WatchConfig", "load_config"]

TOP_KEYS = ("archive", "snapshots", "keep_days", "max_disk_mb", "lanes", "mqtt", "camera",
            "alert")
# A [[camera]] block takes every per-camera option of `edgecap watch` and every generation option.
CAMERA_KEYS = ("name", "source", *(o.name for o in WATCH), *(o.name for o in GENERATION))
CAMERA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # safe in MQTT topics, file names, labels
NODE_ID = re.compile(r"[A-Za-z0-9_-]+")  # what Home Assistant's discovery topics allow


@dataclass(frozen=True)
class CameraConfig:
    """One camera: its name (in records, the archive, topics and metrics), source and options.

    ``options`` holds only what the file sets, keyed by option name: the ``WATCH`` options
    (``edgecap watch``'s flags) and the ``GENERATION`` ones (``num_beams``, ...).
    """

    name: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)

    def args(self, base: argparse.Namespace) -> argparse.Namespace:
        """``base`` (the parsed ``watch`` command line) with this camera's source, name and
        options laid over it: what a single-camera ``edgecap watch`` would have parsed."""
        merged = argparse.Namespace(**vars(base))
        merged.source, merged.camera = self.source, self.name
        for key, value in self.options.items():
            setattr(merged, key, value)
        return merged


@dataclass(frozen=True)
class WatchConfig:
    """Everything in a cameras.toml file, checked."""

    path: Path
    cameras: list[CameraConfig]
    alerts: list[AlertRule] = field(default_factory=list)
    archive: Path | None = None
    snapshots: Path | None = None
    keep_days: float | None = None
    max_disk_mb: float | None = None
    lanes: int | None = None  # inference lanes (None: the command line's, else one per thread)
    mqtt: MqttBroker | None = None  # [mqtt]: the default broker of alerts and camera state
    state_topic: str | None = None  # [mqtt] state_topic: PREFIX/CAMERA/state, retained
    discovery: bool = False  # [mqtt] discovery: announce entities to Home Assistant
    discovery_prefix: str = "homeassistant"  # Home Assistant's discovery topic prefix
    node_id: str | None = None  # this box in discovery topics (None: from the host name)


def load_config(path: str | os.PathLike) -> WatchConfig:
    """Read and check a cameras.toml file.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid TOML (with tomllib's line
            and column), or has an unknown key, a bad value, a duplicate camera name, a bad
            alert query, regex or time window, or a secret whose variable or file is missing.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    # The config names cameras (whose URLs may hold credentials) and where the secrets are.
    warn_if_readable(path, "config file")
    source = ConfigSource(path, path.resolve().parent, KeyLines(text))
    return _watch_config(ConfigTable(source, data, ()))


def _watch_config(top: ConfigTable) -> WatchConfig:
    top.only(TOP_KEYS)
    archive, snapshots = top.path("archive"), top.path("snapshots")
    if snapshots is not None and archive is None:
        raise top.error("snapshots", "needs archive (snapshots are kept with archived captions)")
    broker, state_topic, discovery = None, None, {}
    if (mqtt := top.table("mqtt")) is not None:
        mqtt.only(MQTT_KEYS)
        broker, state_topic = broker_settings(mqtt, None), publish_topic(mqtt, "state_topic")
        discovery = _discovery(mqtt, state_topic)
    cameras = [_camera(t) for t in _blocks(top, "camera", required=True)]
    _check_unique(top, cameras)
    names = tuple(camera.name for camera in cameras)
    alerts = [alert(t, names, broker, mqtt) for t in _blocks(top, "alert", required=False)]
    return WatchConfig(path=top.source.path, cameras=cameras, alerts=alerts, archive=archive,
                       snapshots=snapshots, keep_days=top.number("keep_days"),
                       max_disk_mb=top.number("max_disk_mb"), lanes=top.option(LANES),
                       mqtt=broker, state_topic=state_topic, **discovery)


def _discovery(mqtt: ConfigTable, state_topic: str | None) -> dict[str, Any]:
    """``WatchConfig``'s Home Assistant discovery fields from ``[mqtt]`` (only those set)."""
    values: dict[str, Any] = {}
    if mqtt.get("discovery", bool, "true or false"):
        if state_topic is None:
            raise mqtt.error("discovery", "needs state_topic: the caption sensors read "
                             "PREFIX/CAMERA/state and availability PREFIX/status")
        values["discovery"] = True
    if (prefix := publish_topic(mqtt, "discovery_prefix")) is not None:
        values["discovery_prefix"] = prefix.strip("/")
    if (node_id := mqtt.text("node_id")) is not None:
        if not NODE_ID.fullmatch(node_id):
            raise mqtt.error("node_id", f"{node_id!r}: letters, digits, _ and - only")
        values["node_id"] = node_id
    return values


def _blocks(top: ConfigTable, key: str, required: bool) -> list[ConfigTable]:
    value = top.data.get(key)
    if value is None and required:
        raise top.error(key, f"no [[{key}]] block: at least one is needed")
    if value is not None and not (isinstance(value, list) and all(isinstance(v, dict)
                                                                  for v in value)):
        raise top.error(key, f"expected [[{key}]] blocks, got {value!r}")
    return [ConfigTable(top.source, item, (key, index)) for index, item in enumerate(value or [])]


def _check_unique(top: ConfigTable, cameras: list[CameraConfig]) -> None:
    seen: set[str] = set()
    for index, camera in enumerate(cameras):
        if camera.name in seen:
            block = ConfigTable(top.source, {}, ("camera", index))
            raise block.error("name", f"duplicate camera name {camera.name!r}")
        seen.add(camera.name)


def _camera(table: ConfigTable) -> CameraConfig:
    table.only(CAMERA_KEYS)
    name = table.text("name", required=True)
    if not CAMERA_NAME.fullmatch(name):
        raise table.error("name", f"{name!r}: use letters, digits, '_', '-' and '.' (the name "
                          "goes into MQTT topics, metric labels and snapshot file names)")
    options = {option.name: table.option(option) for option in (*WATCH, *GENERATION)}
    return CameraConfig(name=name, source=table.text("source", required=True),
                        options={k: v for k, v in options.items() if v is not None})
