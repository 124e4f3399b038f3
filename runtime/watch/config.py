"""``edgecap watch --config cameras.toml``: cameras and alert rules in one TOML file.

Read with stdlib ``tomllib``; every key is known and checked (type and bounds) before anything
starts, and every problem is one ``ConfigError`` line ``FILE:LINE: key: problem``. tomllib gives
no line numbers, so ``_KeyLines`` finds the line of a key within its ``[[camera]]``/``[[alert]]``
block by reading the text. Secrets never need to sit in the file: ``password_env``/
``password_file`` and ``headers_env``/``headers_file`` name where they are. Relative paths are
relative to the config file's folder. See docs/alerts.md.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..alerts.targets import CommandTarget, MqttBroker, MqttTarget, WebhookTarget
from ..alerts.rules import DEFAULT_COOLDOWN_S, AlertError, AlertRule, check_fts_query, parse_clock
from ..errors import EdgecapError
from ..options import GENERATION, OptionsError
from ..secret_files import looks_secret, redact_url, secret_in_url, warn_if_readable
from .lanes import LANES

TOP_KEYS = ("archive", "snapshots", "keep_days", "max_disk_mb", "lanes", "mqtt", "camera",
            "alert")
# The names (argparse dests) of `edgecap watch`'s per-camera flags, and their checks.
WATCH_OPTIONS = ("fps", "scene_threshold", "heartbeat", "changes_only", "realtime", "timeout_s")
CAMERA_KEYS = ("name", "source", *WATCH_OPTIONS, *(o.name for o in GENERATION))
ALERT_KEYS = ("name", "match", "regex", "min_score", "cameras", "between", "cooldown_s", "command",
              "command_timeout_s", "mqtt", "webhook")
BROKER_KEYS = ("host", "port", "username", "password_env", "password_file", "client_id",
               "keepalive_s", "tls", "ca_file", "reconnect_max_s")
MQTT_KEYS = (*BROKER_KEYS, "topic", "state_topic", "discovery", "discovery_prefix", "node_id")
ALERT_MQTT_KEYS = (*BROKER_KEYS, "topic", "retain")
WEBHOOK_KEYS = ("url", "url_env", "url_file", "headers", "headers_env", "headers_file",
                "timeout_s", "retries", "backoff_s")
CAMERA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # safe in MQTT topics, file names, labels
NODE_ID = re.compile(r"[A-Za-z0-9_-]+")  # what Home Assistant's discovery topics allow


class ConfigError(EdgecapError, ValueError):
    """A camera config file that cannot be used: ``FILE:LINE: key: problem``."""


@dataclass(frozen=True)
class CameraConfig:
    """One camera: its name (in records, the archive, topics and metrics), source and options.

    ``options`` holds only what the file sets, keyed by the ``edgecap watch`` flags' dests
    (``fps``, ``scene_threshold``, ``heartbeat``, ``changes_only``, ``realtime``,
    ``timeout_s``) and the generation option names (``num_beams``, ``max_new_tokens``, ...).
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


class _KeyLines:
    """Line numbers of keys in TOML text, per block: ``()`` is the top level (and plain
    ``[table]``s), ``("camera", 2)`` the third ``[[camera]]``."""

    HEADER = re.compile(r"\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
    KEY = re.compile(r"\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
                     r"(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")

    def __init__(self, text: str):
        self.lines: dict[tuple[tuple, tuple[str, ...]], int] = {}
        counts: dict[str, int] = {}
        block: tuple = ()
        prefix: tuple[str, ...] = ()
        in_string: str | None = None  # inside a multi-line string: no keys there
        for number, line in enumerate(text.splitlines(), 1):
            if in_string:
                in_string = None if line.count(in_string) % 2 else in_string
                continue
            if header := self.HEADER.match(line):
                parts = self._split(header.group(2))
                if header.group(1) == "[[":
                    counts[parts[0]] = counts.get(parts[0], 0) + 1
                    block, prefix = (parts[0], counts[parts[0]] - 1), parts[1:]
                elif parts[0] in counts:  # [alert.mqtt]: a table inside the last [[alert]]
                    block, prefix = (parts[0], counts[parts[0]] - 1), parts[1:]
                else:
                    block, prefix = (), parts
                self.lines.setdefault((block, prefix), number)
            elif key := self.KEY.match(line):
                self.lines.setdefault((block, prefix + self._split(key.group(1))), number)
                for quote in ('"""', "'''"):
                    if line.count(quote) % 2:
                        in_string = quote

    @staticmethod
    def _split(dotted: str) -> tuple[str, ...]:
        return tuple(part.strip().strip("\"'") for part in dotted.split("."))

    def line(self, block: tuple, keys: tuple[str, ...]) -> int:
        """The line of ``keys`` in ``block``, else of its closest parent (an inline table's
        key is on its parent's line), else of the block's header."""
        for end in range(len(keys), -1, -1):
            if (block, keys[:end]) in self.lines:
                return self.lines[(block, keys[:end])]
        return self.lines.get(((), block[:1]), 1)  # camera = [{...}]: an inline array of tables


class _Table:
    """One TOML table of the file, with checked getters whose errors say file, line and key."""

    def __init__(self, source: _Source, data: dict, block: tuple, keys: tuple[str, ...] = ()):
        self.source, self.data, self.block, self.keys = source, data, block, keys

    def error(self, key: str | None, problem: str) -> ConfigError:
        keys = self.keys + ((key,) if key else ())
        name = ".".join(((self.block[0],) if self.block else ()) + keys) or "file"
        line = self.source.key_lines.line(self.block, keys)
        return ConfigError(f"{self.source.path}:{line}: {name}: {problem}")

    def only(self, known: tuple[str, ...]) -> None:
        for key in self.data:
            if key == "password" and "password_env" in known:
                raise self.error(key, "keep secrets out of the config: use password_env "
                                 "(an environment variable's name) or password_file")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
                raise self.error(key, f"unknown key{hint}")

    def get(self, key: str, kinds: type | tuple[type, ...], what: str) -> Any:
        value = self.data.get(key)
        if value is None:
            return None
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        # TOML's true is a Python int too: a number option must not accept it
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(key, f"expected {what}, got {value!r}")
        return value

    def text(self, key: str, required: bool = False) -> str | None:
        value = self.get(key, str, "a string")
        if value is None and required:
            raise self.error(key, "missing (required)")
        if value is not None and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def number(self, key: str, low: float = 0.0, high: float | None = None,
               low_open: bool = True) -> float | None:
        value = self.get(key, (int, float), "a number")
        if value is None:
            return None
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high else "")
            raise self.error(key, f"must be {bound} (got {value})")
        return float(value)

    def integer(self, key: str, low: int, high: int) -> int | None:
        value = self.get(key, int, "an integer")
        if value is not None and not low <= value <= high:
            raise self.error(key, f"must be between {low} and {high} (got {value})")
        return value

    def table(self, key: str) -> _Table | None:
        value = self.get(key, dict, "a table")
        return None if value is None else _Table(self.source, value, self.block, self.keys + (key,))

    def path(self, key: str) -> Path | None:
        value = self.text(key)
        return None if value is None else self.source.folder / Path(value).expanduser()

    def secret_file(self, key: str) -> str | None:
        path = self.path(key)
        try:
            text = None if path is None else path.read_text().strip()
        except OSError as exc:
            raise self.error(key, f"cannot read {path}: {exc.strerror or exc}") from None
        if path is not None:
            warn_if_readable(path, f"{key} of {self.source.path.name}:")
        return text

    def secret_env(self, key: str, name: str | None = None) -> str | None:
        variable = name if name is not None else self.text(key)
        if variable is not None and variable not in os.environ:
            raise self.error(key, f"environment variable {variable} is not set")
        return None if variable is None else os.environ[variable]


@dataclass
class _Source:
    path: Path
    folder: Path
    key_lines: _KeyLines


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
    source = _Source(path, path.resolve().parent, _KeyLines(text))
    return _watch_config(_Table(source, data, ()))


def _watch_config(top: _Table) -> WatchConfig:
    top.only(TOP_KEYS)
    archive, snapshots = top.path("archive"), top.path("snapshots")
    if snapshots is not None and archive is None:
        raise top.error("snapshots", "needs archive (snapshots are kept with archived captions)")
    broker, state_topic, discovery = None, None, {}
    if (mqtt := top.table("mqtt")) is not None:
        mqtt.only(MQTT_KEYS)
        broker, state_topic = _broker(mqtt, None), _topic(mqtt, "state_topic")
        discovery = _discovery(mqtt, state_topic)
    cameras = [_camera(t) for t in _blocks(top, "camera", required=True)]
    _check_unique(top, cameras)
    names = tuple(camera.name for camera in cameras)
    alerts = [_alert(t, names, broker, mqtt) for t in _blocks(top, "alert", required=False)]
    return WatchConfig(path=top.source.path, cameras=cameras, alerts=alerts, archive=archive,
                       snapshots=snapshots, keep_days=top.number("keep_days"),
                       max_disk_mb=top.number("max_disk_mb"), lanes=_generation(top, LANES),
                       mqtt=broker, state_topic=state_topic, **discovery)


def _discovery(mqtt: _Table, state_topic: str | None) -> dict[str, Any]:
    """``WatchConfig``'s Home Assistant discovery fields from ``[mqtt]`` (only those set)."""
    values: dict[str, Any] = {}
    if mqtt.get("discovery", bool, "true or false"):
        if state_topic is None:
            raise mqtt.error("discovery", "needs state_topic: the caption sensors read "
                             "PREFIX/CAMERA/state and availability PREFIX/status")
        values["discovery"] = True
    if (prefix := _topic(mqtt, "discovery_prefix")) is not None:
        values["discovery_prefix"] = prefix.strip("/")
    if (node_id := mqtt.text("node_id")) is not None:
        if not NODE_ID.fullmatch(node_id):
            raise mqtt.error("node_id", f"{node_id!r}: letters, digits, _ and - only")
        values["node_id"] = node_id
    return values


def _blocks(top: _Table, key: str, required: bool) -> list[_Table]:
    value = top.data.get(key)
    if value is None and required:
        raise top.error(key, f"no [[{key}]] block: at least one is needed")
    if value is not None and not (isinstance(value, list) and all(isinstance(v, dict)
                                                                  for v in value)):
        raise top.error(key, f"expected [[{key}]] blocks, got {value!r}")
    return [_Table(top.source, item, (key, index)) for index, item in enumerate(value or [])]


def _check_unique(top: _Table, cameras: list[CameraConfig]) -> None:
    seen: set[str] = set()
    for index, camera in enumerate(cameras):
        if camera.name in seen:
            block = _Table(top.source, {}, ("camera", index))
            raise block.error("name", f"duplicate camera name {camera.name!r}")
        seen.add(camera.name)


def _camera(table: _Table) -> CameraConfig:
    table.only(CAMERA_KEYS)
    name = table.text("name", required=True)
    if not CAMERA_NAME.fullmatch(name):
        raise table.error("name", f"{name!r}: use letters, digits, '_', '-' and '.' (the name "
                          "goes into MQTT topics, metric labels and snapshot file names)")
    options: dict[str, Any] = {}
    for key in ("fps", "heartbeat", "timeout_s"):
        options[key] = table.number(key)
    options["scene_threshold"] = table.number("scene_threshold", 0.0, 1.0, low_open=False)
    for key in ("changes_only", "realtime"):
        options[key] = table.get(key, bool, "true or false")
    for option in GENERATION:
        options[option.name] = _generation(table, option)
    return CameraConfig(name=name, source=table.text("source", required=True),
                        options={k: v for k, v in options.items() if v is not None})


def _generation(table: _Table, option) -> Any:
    """A generation option, or another declared ``Option`` (lanes): TOML's own type first (no
    numbers in strings), then its bounds."""
    kind = option.schema.get("type")
    if kind == "integer":
        value = table.get(option.name, int, "an integer")
    elif kind == "number":
        value = table.get(option.name, (int, float), "a number")
    else:  # early_stopping: true, false or "never"
        value = table.get(option.name, (bool, str), 'true, false or "never"')
    try:
        return None if value is None else option.check(value)
    except OptionsError as exc:
        raise table.error(option.name, str(exc).removeprefix(f"{option.name}: ")
                          .removeprefix(f"{option.name} ")) from None


def _topic(table: _Table, key: str) -> str | None:
    topic = table.text(key)
    if topic is not None and ("+" in topic or "#" in topic):
        raise table.error(key, f"{topic!r}: a topic to publish on has no wildcards (+, #)")
    return topic


def _broker(table: _Table, default: MqttBroker | None) -> MqttBroker:
    """Broker settings from ``table``, each unset one taken from ``default`` ([mqtt])."""
    base = default or MqttBroker()
    password = table.secret_env("password_env") or table.secret_file("password_file")
    ca_file = table.path("ca_file")
    if ca_file is not None and not ca_file.is_file():
        raise table.error("ca_file", f"no such file: {ca_file}")
    values = dict(host=table.text("host"), port=table.integer("port", 1, 65535),  # noqa: C408
                  username=table.text("username"), password=password,
                  client_id=table.text("client_id"),
                  keepalive_s=table.integer("keepalive_s", 5, 65535),
                  tls=True if ca_file is not None else table.get("tls", bool, "true or false"),
                  ca_file=None if ca_file is None else str(ca_file),  # implies tls
                  reconnect_max_s=table.number("reconnect_max_s", 1.0, low_open=False))
    return MqttBroker(**{key: getattr(base, key) if value is None else value
                         for key, value in values.items()})


def _alert(table: _Table, cameras: tuple[str, ...], broker: MqttBroker | None,
           mqtt_defaults: _Table | None) -> AlertRule:
    table.only(ALERT_KEYS)
    match, regex = table.text("match"), table.text("regex")
    min_score = _min_score(table)
    if match is not None and regex is not None:
        raise table.error("match", "set one of match and regex, not both")
    if match is None and regex is None and not min_score:
        raise table.error(None, "set match, regex or min_score")
    try:
        if match is not None:
            check_fts_query(match)
        elif regex is not None:
            re.compile(regex)
    except (ValueError, re.error) as exc:
        raise table.error("match" if match is not None else "regex", str(exc)) from None
    targets = _targets(table, broker, mqtt_defaults)
    cooldown = table.number("cooldown_s", 0.0, low_open=False)
    try:
        return AlertRule(name=table.text("name") or "", match=match, regex=regex,
                         cameras=_alert_cameras(table, cameras), between=_between(table),
                         cooldown_s=DEFAULT_COOLDOWN_S if cooldown is None else cooldown,
                         targets=targets, min_score=min_score)
    except AlertError as exc:
        raise table.error(None, str(exc)) from None


def _min_score(table: _Table) -> tuple[tuple[str, float], ...]:
    """``min_score = { person = 0.8 }``: presence labels and the least score each needs."""
    scores = table.table("min_score")
    if scores is None:
        return ()
    if not scores.data:
        raise table.error("min_score", "empty: name at least one label, e.g. { person = 0.8 }")
    return tuple((label, scores.number(label, 0.0, 1.0, low_open=False))
                 for label in scores.data)


def _alert_cameras(table: _Table, cameras: tuple[str, ...]) -> tuple[str, ...] | None:
    names = table.get("cameras", list, "a list of camera names")
    if names is None:
        return None
    for name in names:
        if name not in cameras:
            close = difflib.get_close_matches(str(name), cameras, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; cameras: {', '.join(cameras)}"
            raise table.error("cameras", f"no camera named {name!r}{hint}")
    return tuple(names)


def _between(table: _Table) -> tuple[Any, Any] | None:
    window = table.get("between", list, 'a list ["HH:MM", "HH:MM"]')
    if window is None:
        return None
    if len(window) != 2:
        raise table.error("between", f'expected ["start", "end"], got {window!r}')
    try:
        start, end = parse_clock(window[0]), parse_clock(window[1])
    except ValueError as exc:
        raise table.error("between", str(exc)) from None
    if start == end:
        raise table.error("between", "start and end are the same time (an empty window)")
    return start, end


def _targets(table: _Table, broker: MqttBroker | None, mqtt_defaults: _Table | None) -> tuple:
    targets: list = []
    if (command := _command(table)) is not None:
        targets.append(command)
    if "mqtt" in table.data:
        targets.append(_alert_mqtt(table, broker, mqtt_defaults))
    if "webhook" in table.data:
        targets.append(_webhook(table))
    if not targets:
        raise table.error(None, "no target: set command, mqtt or webhook")
    return tuple(targets)


def _command(table: _Table) -> CommandTarget | None:
    argv = table.get("command", list, 'a list of arguments, e.g. ["notify-send", "edgecap"]')
    if argv is None:
        return None
    if not argv or not all(isinstance(arg, str) for arg in argv):
        raise table.error("command", f"expected a non-empty list of strings, got {argv!r}")
    timeout = table.number("command_timeout_s")
    return CommandTarget(tuple(argv), **({"timeout_s": timeout} if timeout else {}))


def _alert_mqtt(table: _Table, broker: MqttBroker | None,
                mqtt_defaults: _Table | None) -> MqttTarget:
    """``mqtt = true`` (the [mqtt] broker and topic) or an inline table overriding them."""
    value = table.data["mqtt"]
    if not (value is True or isinstance(value, dict)):
        raise table.error("mqtt", f'expected true or a table like {{ topic = "..." }}, '
                          f"got {value!r}")
    sub = _Table(table.source, {} if value is True else value, table.block,
                 table.keys + ("mqtt",))
    sub.only(ALERT_MQTT_KEYS)
    default_topic = _topic(mqtt_defaults, "topic") if mqtt_defaults else None
    topic = _topic(sub, "topic") or default_topic or MqttTarget.topic
    return MqttTarget(_broker(sub, broker), topic=topic,
                      retain=bool(sub.get("retain", bool, "true or false")))


def _webhook(table: _Table) -> WebhookTarget:
    """``webhook = "http://..."`` or a table with url, headers, secrets and retry settings."""
    if isinstance(table.data["webhook"], str):
        sub = _Table(table.source, {"url": table.data["webhook"]}, table.block, table.keys)
        url_key = "webhook"
    elif (sub := table.table("webhook")) is None:
        raise table.error("webhook", "expected a URL or a table")
    else:
        sub.only(WEBHOOK_KEYS)
        url_key = "url"
    owner = table if url_key == "webhook" else sub
    url = sub.text("url")
    if url is not None and (secret := secret_in_url(url)):
        raise owner.error(url_key, f"keep secrets out of the config: the URL has {secret}; use "
                          "url_env (an environment variable's name) or url_file")
    url = url or sub.secret_env("url_env") or sub.secret_file("url_file")
    if url is None:
        raise owner.error(url_key, "missing (required): give url, url_env or url_file")
    if not re.match(r"https?://[^/\s]+", url):
        raise owner.error(url_key, f"{redact_url(url)!r}: expected an http:// or https:// URL")
    extra = {k: v for k, v in (("timeout_s", sub.number("timeout_s")),
                               ("retries", sub.integer("retries", 0, 10)),
                               ("backoff_s", sub.number("backoff_s", 0.0, low_open=False)))
             if v is not None}
    return WebhookTarget(url, headers=_headers(sub), **extra)


def _headers(sub: _Table) -> tuple[tuple[str, str], ...]:
    """Plain ``headers``, ``headers_env`` (header -> variable) and ``headers_file`` lines."""
    headers = dict(sub.get("headers", dict, "a table of header = value") or {})
    for header in headers:
        if looks_secret(str(header)):
            raise sub.error("headers", f"{header}: keep secrets out of the config: use "
                            "headers_env (header = VARIABLE) or headers_file")
    for header, variable in (sub.get("headers_env", dict, "a table of header = VARIABLE")
                             or {}).items():
        headers[header] = sub.secret_env("headers_env", str(variable))
    for number, line in enumerate((sub.secret_file("headers_file") or "").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            name, colon, value = line.partition(":")
            if not colon or not name.strip():  # the line itself may be a secret: not echoed
                raise sub.error("headers_file", f"line {number}: expected 'Name: value'")
            headers[name.strip()] = value.strip()
    if not all(isinstance(v, str) for v in headers.values()):
        raise sub.error("headers", "header values must be strings")
    return tuple(headers.items())
