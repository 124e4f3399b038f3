"""The ``[[alert]]`` blocks and MQTT settings of ``watch --config``, checked into alert rules,
targets and brokers (see docs/alerts.md)."""

from __future__ import annotations

import difflib
import re
from typing import Any

from ..alerts.rules import DEFAULT_COOLDOWN_S, AlertError, AlertRule, check_fts_query, parse_clock
from ..alerts.targets import CommandTarget, MqttBroker, MqttTarget, WebhookTarget
from ..secret_files import looks_secret, redact_url, secret_in_url
from .toml_table import ConfigTable

ALERT_KEYS = ("name", "match", "regex", "min_score", "cameras", "between", "cooldown_s", "command",
              "command_timeout_s", "mqtt", "webhook")
BROKER_KEYS = ("host", "port", "username", "password_env", "password_file", "client_id",
               "keepalive_s", "tls", "ca_file", "reconnect_max_s")
MQTT_KEYS = (*BROKER_KEYS, "topic", "state_topic", "discovery", "discovery_prefix", "node_id")
ALERT_MQTT_KEYS = (*BROKER_KEYS, "topic", "retain")
WEBHOOK_KEYS = ("url", "url_env", "url_file", "headers", "headers_env", "headers_file",
                "timeout_s", "retries", "backoff_s")

def publish_topic(table: ConfigTable, key: str) -> str | None:
    topic = table.text(key)
    if topic is not None and ("+" in topic or "#" in topic):
        raise table.error(key, f"{topic!r}: a topic to publish on has no wildcards (+, #)")
    return topic


def broker_settings(table: ConfigTable, default: MqttBroker | None) -> MqttBroker:
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


def alert(table: ConfigTable, cameras: tuple[str, ...], broker: MqttBroker | None,
           mqtt_defaults: ConfigTable | None) -> AlertRule:
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


def _min_score(table: ConfigTable) -> tuple[tuple[str, float], ...]:
    """``min_score = { person = 0.8 }``: presence labels and the least score each needs."""
    scores = table.table("min_score")
    if scores is None:
        return ()
    if not scores.data:
        raise table.error("min_score", "empty: name at least one label, e.g. { person = 0.8 }")
    return tuple((label, scores.number(label, 0.0, 1.0, low_open=False))
                 for label in scores.data)


def _alert_cameras(table: ConfigTable, cameras: tuple[str, ...]) -> tuple[str, ...] | None:
    names = table.get("cameras", list, "a list of camera names")
    if names is None:
        return None
    for name in names:
        if name not in cameras:
            close = difflib.get_close_matches(str(name), cameras, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; cameras: {', '.join(cameras)}"
            raise table.error("cameras", f"no camera named {name!r}{hint}")
    return tuple(names)


def _between(table: ConfigTable) -> tuple[Any, Any] | None:
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


def _targets(table: ConfigTable, broker: MqttBroker | None,
             mqtt_defaults: ConfigTable | None) -> tuple:
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


def _command(table: ConfigTable) -> CommandTarget | None:
    argv = table.get("command", list, 'a list of arguments, e.g. ["notify-send", "edgecap"]')
    if argv is None:
        return None
    if not argv or not all(isinstance(arg, str) for arg in argv):
        raise table.error("command", f"expected a non-empty list of strings, got {argv!r}")
    timeout = table.number("command_timeout_s")
    return CommandTarget(tuple(argv), **({"timeout_s": timeout} if timeout else {}))


def _alert_mqtt(table: ConfigTable, broker: MqttBroker | None,
                mqtt_defaults: ConfigTable | None) -> MqttTarget:
    """``mqtt = true`` (the [mqtt] broker and topic) or an inline table overriding them."""
    value = table.data["mqtt"]
    if not (value is True or isinstance(value, dict)):
        raise table.error("mqtt", f'expected true or a table like {{ topic = "..." }}, '
                          f"got {value!r}")
    sub = ConfigTable(table.source, {} if value is True else value, table.block,
                 table.keys + ("mqtt",))
    sub.only(ALERT_MQTT_KEYS)
    default_topic = publish_topic(mqtt_defaults, "topic") if mqtt_defaults else None
    topic = publish_topic(sub, "topic") or default_topic or MqttTarget.topic
    return MqttTarget(broker_settings(sub, broker), topic=topic,
                      retain=bool(sub.get("retain", bool, "true or false")))


def _webhook(table: ConfigTable) -> WebhookTarget:
    """``webhook = "http://..."`` or a table with url, headers, secrets and retry settings."""
    if isinstance(table.data["webhook"], str):
        sub = ConfigTable(table.source, {"url": table.data["webhook"]}, table.block, table.keys)
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


def _headers(sub: ConfigTable) -> tuple[tuple[str, str], ...]:
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
