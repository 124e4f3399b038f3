"""Alert rules over captions, delivered to commands, webhooks and MQTT without blocking captioning.

A rule matches a caption by an FTS5 query, with the same syntax and tokenizer as the archive's
``edgecap search`` (``person OR man``, ``"red car"``, ``dog NOT cat``, ``pers*``), or by a
regular expression; optionally only on some cameras and within a local time window. One alert
per event: a match within ``cooldown_s`` of the previous match of the same rule on the same
camera belongs to the same event and sends nothing.

``Alerts.offer(record)`` evaluates the rules on the caller's thread (a one-row in-memory index:
cheap) and queues deliveries for one worker thread per target kind (``alert_targets``,
``alert_mqtt``); it never waits on a target.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .targets import (
    AlertStats,
    CommandTarget,
    Delivery,
    DeliveryQueue,
    MqttBroker,
    MqttTarget,
    Target,
    WebhookTarget,
    post_webhook,
    run_command,
)
from ..archive.schema import FTS_TOKENIZER
from ..errors import EdgecapError
from ..results import record_keys

__all__ = ["AlertError", "AlertRule", "Alerts", "CaptionMatcher", "CommandTarget", "MqttBroker",
           "MqttTarget", "WebhookTarget", "check_fts_query", "parse_clock"]

log = logging.getLogger("edgecap.alerts")
DEFAULT_QUEUE_SIZE = 100  # alerts waiting per target kind before new ones are dropped
DEFAULT_COOLDOWN_S = 60.0
PAYLOAD_KEYS = record_keys("alert")  # what an alert and a camera's state message carry
# The archive's tokenizer, so a rule matches what `edgecap search` finds.
FTS_TABLE = f"CREATE VIRTUAL TABLE one_caption USING fts5 (caption, tokenize='{FTS_TOKENIZER}')"


class AlertError(EdgecapError, ValueError):
    """An alert rule that cannot work (bad query, regex, time window or target)."""


def check_fts_query(query: str) -> None:
    """Raise ValueError (with SQLite's reason) unless ``query`` is valid FTS5 syntax."""
    with sqlite3.connect(":memory:") as conn:
        conn.execute(FTS_TABLE)
        try:
            conn.execute("SELECT 1 FROM one_caption WHERE one_caption MATCH ?", (query,)).fetchall()
        except sqlite3.Error as exc:
            raise ValueError(f"{exc}; put words with punctuation in double quotes, "
                             'e.g. "t-shirt"') from None


def parse_clock(value: str | dt.time) -> dt.time:
    """``"22:00"`` or ``"22:00:30"`` (or a TOML local time) as a ``datetime.time``."""
    if isinstance(value, dt.time):
        return value
    found = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", value.strip()) if isinstance(
        value, str) else None
    if found:
        try:
            return dt.time(*(int(part) for part in found.groups(default="0")))
        except ValueError:  # 25:00, 12:61
            pass
    raise ValueError(f"expected a local time like \"22:00\", got {value!r}")


@dataclass(frozen=True)
class AlertRule:
    """When to alert and where to.

    Args:
        name: named in every alert (``rule``); default: the query or regex.
        match: an FTS5 query (the archive's search syntax). At most one of match and regex.
        regex: a regular expression searched in the caption, case-insensitively.
        min_score: ``(label, score)`` pairs: the record's tag ``label`` (a grounded model's
            presence score, e.g. person) must be at least ``score``; a record without the tag
            never matches. A rule needs words (match or regex), scores, or both.
        cameras: only these cameras (default: all).
        between: a local time window ``(start, end)``; it wraps midnight when end < start.
        cooldown_s: matches closer than this (by the records' wall time) are one event.
        targets: where each alert goes.

    Raises:
        AlertError: a bad query, regex or window, a negative cooldown, or no target.
    """

    name: str = ""
    match: str | None = None
    regex: str | None = None
    cameras: tuple[str, ...] | None = None
    between: tuple[dt.time, dt.time] | None = None
    cooldown_s: float = DEFAULT_COOLDOWN_S
    targets: tuple[Target, ...] = ()
    min_score: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.match is not None and self.regex is not None:
            raise AlertError("an alert rule takes one of match and regex, not both")
        if self.match is None and self.regex is None and not self.min_score:
            raise AlertError("an alert rule needs match, regex or min_score")
        for label, low in self.min_score:
            if not 0.0 <= low <= 1.0:
                raise AlertError(f"min_score.{label} must be between 0 and 1 (got {low})")
        try:
            if self.match is not None:
                check_fts_query(self.match)
            elif self.regex is not None:
                re.compile(self.regex)
        except (ValueError, re.error) as exc:
            raise AlertError(f"alert {self.match or self.regex!r}: {exc}") from None
        if self.between is not None and self.between[0] == self.between[1]:
            raise AlertError("between: start and end are the same time")
        if self.cooldown_s < 0:
            raise AlertError(f"cooldown_s must be >= 0 (got {self.cooldown_s})")
        if not self.targets:
            raise AlertError("an alert rule needs a target: command, mqtt or webhook")
        if not self.name:
            scores = " ".join(f"{label}>={low:g}" for label, low in self.min_score)
            object.__setattr__(self, "name", self.match or self.regex or scores)

    def scores_met(self, record: Mapping[str, Any]) -> bool:
        """Whether every ``min_score`` label is among the record's tags with a high enough score
        (labels compare case-insensitively, as in the archive's ``tag:`` searches)."""
        if not self.min_score:
            return True
        tags = record.get("tags")
        found = {str(t.get("label")).lower(): t.get("score") for t in tags
                 if isinstance(t, dict)} if isinstance(tags, list) else {}
        return all(isinstance(found.get(label.lower()), (int, float))
                   and found[label.lower()] >= low for label, low in self.min_score)

    def watches(self, camera: str) -> bool:
        """Whether captions of ``camera`` are checked by this rule."""
        return self.cameras is None or camera in self.cameras

    def in_window(self, local: dt.time) -> bool:
        """Whether the local time of day ``local`` lies in ``between`` (start included)."""
        if self.between is None:
            return True
        start, end = self.between
        if start < end:
            return start <= local < end
        return local >= start or local < end  # the window wraps midnight


class CaptionMatcher:
    """Which rules' words match a caption: their FTS5 queries run against a one-row in-memory
    index with the archive's tokenizer; regexes run through ``re``. Thread-safe."""

    def __init__(self, rules: Iterable[AlertRule]):
        self._rules = list(rules)
        self._regex = {i: re.compile(r.regex, re.IGNORECASE) for i, r in enumerate(self._rules)
                       if r.regex is not None}
        self._conn = sqlite3.connect(":memory:", check_same_thread=False)
        self._conn.execute(FTS_TABLE)
        self._lock = threading.Lock()

    def matches(self, caption: str) -> list[bool]:
        """One flag per rule, in order: does the caption match its query or regex?"""
        # A rule without words (only min_score) matches every caption here.
        flags = [bool(self._regex[i].search(caption)) if i in self._regex else r.match is None
                 for i, r in enumerate(self._rules)]
        queries = [(i, r.match) for i, r in enumerate(self._rules) if r.match is not None]
        if not queries:
            return flags
        with self._lock:
            self._conn.execute("DELETE FROM one_caption")
            self._conn.execute("INSERT INTO one_caption (rowid, caption) VALUES (1, ?)", (caption,))
            for i, query in queries:
                found = self._conn.execute("SELECT 1 FROM one_caption WHERE one_caption MATCH ?",
                                           (query,)).fetchone()
                flags[i] = found is not None
        return flags


def _record_time(record: Mapping[str, Any]) -> dt.datetime:
    """The record's ``wall_time`` as an aware datetime (now, when it has none or a bad one)."""
    try:
        when = dt.datetime.fromisoformat(str(record["wall_time"]).replace("Z", "+00:00"))
        return when if when.tzinfo else when.astimezone()  # naive: local time
    except (KeyError, ValueError):
        return dt.datetime.now().astimezone()


def alert_payload(record: Mapping[str, Any], rule: str | None = None) -> dict[str, Any]:
    """The fields an alert (or a camera's state message) carries; ``rule`` when it is an alert."""
    payload = {key: record.get(key) for key in PAYLOAD_KEYS}
    if rule is not None:
        payload["rule"] = rule
    return payload


class Alerts:
    """Evaluates rules on each caption record and delivers alerts in the background.

    Args:
        rules: the alert rules.
        state_broker: publish each camera's latest caption (retained) to this broker...
        state_topic_prefix: ...on ``PREFIX/CAMERA/state``, with ``PREFIX/status`` holding
            ``online``/``offline``. Both are needed for state messages.
        queue_size: alerts that may wait per target kind (per broker for MQTT); more drop.

    Raises:
        ModuleNotFoundError: an MQTT target or state broker without paho-mqtt ([alerts] extra).
    """

    def __init__(self, rules: Iterable[AlertRule], *, state_broker: MqttBroker | None = None,
                 state_topic_prefix: str | None = None, queue_size: int = DEFAULT_QUEUE_SIZE):
        self.rules = list(rules)
        self._matcher = CaptionMatcher(self.rules)
        self._stats = AlertStats()
        self._queue_size = queue_size
        self._last_match: dict[tuple[int, str], float] = {}
        self._lock = threading.Lock()
        self._queues: dict[str, DeliveryQueue] = {}
        self._publishers: dict[MqttBroker, Any] = {}
        self._state_prefix = state_topic_prefix.rstrip("/") if state_topic_prefix else None
        self._state = self._publisher(state_broker) if state_broker and self._state_prefix else None
        for target in (t for rule in self.rules for t in rule.targets):
            self._sink(target)  # start every worker now: a broken broker shows at startup

    @classmethod
    def from_config(cls, config: Any, queue_size: int = DEFAULT_QUEUE_SIZE) -> Alerts:
        """Alerts for a ``camera_config.WatchConfig`` (its rules and MQTT state settings)."""
        return cls(config.alerts, state_broker=config.mqtt, state_topic_prefix=config.state_topic,
                   queue_size=queue_size)

    def _publisher(self, broker: MqttBroker):
        if broker not in self._publishers:
            from .mqtt import MqttPublisher

            status = f"{self._state_prefix}/status" if self._state_prefix else None
            self._publishers[broker] = MqttPublisher(broker, self._stats, self._queue_size,
                                                     status_topic=status)
        return self._publishers[broker]

    def _sink(self, target: Target):
        """Whatever queues deliveries for ``target``: its kind's worker or its broker's."""
        if isinstance(target, MqttTarget):
            return self._publisher(target.broker)
        if target.kind not in self._queues:
            deliver = run_command if isinstance(target, CommandTarget) else post_webhook
            self._queues[target.kind] = DeliveryQueue(target.kind, deliver, self._stats,
                                                      self._queue_size)
        return self._queues[target.kind]

    def offer(self, record: Mapping[str, Any]) -> list[str]:
        """Check one watch record against the rules and queue its alerts; never blocks.

        Returns:
            The names of the rules that fired (matched, outside their cooldown).
        """
        caption = record.get("generated_text")
        if not isinstance(caption, str) or record.get("status", "ok") != "ok":
            return []
        camera = str(record.get("camera") or "")
        if self._state is not None:
            topic = f"{self._state_prefix}/{camera or 'default'}/state"
            self._state.put_state(camera, topic, json.dumps(alert_payload(record)).encode())
        fired = self._fired(camera, caption, record)
        for rule in fired:
            body = json.dumps(alert_payload(record, rule.name)).encode()
            for target in rule.targets:
                self._sink(target).put(Delivery(target, camera, body))
        return [rule.name for rule in fired]

    def _fired(self, camera: str, caption: str, record: Mapping[str, Any]) -> list[AlertRule]:
        flags = self._matcher.matches(caption)
        when = _record_time(record)
        local, ts, fired = when.astimezone().time(), when.timestamp(), []
        with self._lock:  # offer() may be called from one thread per camera
            for index, (rule, hit) in enumerate(zip(self.rules, flags)):
                if not (hit and rule.scores_met(record) and rule.watches(camera)
                        and rule.in_window(local)):
                    continue
                last = self._last_match.get((index, camera))
                self._last_match[(index, camera)] = ts  # every match extends the event
                if last is None or ts - last >= rule.cooldown_s:
                    fired.append(rule)
        return fired

    def stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{camera: {"command"|"mqtt"|"webhook": {sent, dropped, failed, queued}}}``."""
        return self._stats.snapshot()

    @property
    def connected(self) -> bool:
        """Whether every MQTT broker in use is connected (True when none is used)."""
        return all(p.connected for p in self._publishers.values())

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for up to ``timeout`` seconds, then stop the workers; what is
        still undelivered is counted as dropped."""
        deadline = time.monotonic() + timeout
        for sink in [*self._queues.values(), *self._publishers.values()]:
            sink.close(deadline)

    def __enter__(self) -> Alerts:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
