"""Home Assistant MQTT discovery for ``edgecap watch --config`` (``discovery = true`` in
``[mqtt]``; paho-mqtt, the ``[alerts]`` extra).

Home Assistant creates entities from retained ``PREFIX/COMPONENT/NODE/OBJECT/config`` messages:

- a **sensor** per camera: its latest caption, read from the retained state topic
  ``STATE/CAMERA/state`` (the record's other fields as attributes);
- an **event** entity per alert rule that publishes to the ``[mqtt]`` broker, fired by the
  rule's alerts (other rules' alerts on a shared topic render to nothing and are ignored);
- all of them available while ``STATE/status`` is ``online`` (the watcher's own status topic)
  and grouped in one device per box (``node_id``).

Announcing is one connection of its own (never the alerts' client id), made again after every
reconnect. On each connect it first collects the retained configs under its node, so that
objects no longer in the config (a camera removed) are deleted with an empty retained message.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import uuid
from typing import Any

from .. import __version__
from ..alerts.targets import MqttTarget
from .config import WatchConfig

log = logging.getLogger("edgecap.alerts")
SYNC_PREFIX = "edgecap/discovery-sync"  # a private topic: its echo ends the retained configs


def default_node_id() -> str:
    """This box in discovery topics: the host name with other characters made ``_``."""
    return _slug(socket.gethostname()) or "edgecap"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def discovery_messages(config: WatchConfig, node_id: str) -> dict[str, dict[str, Any]]:
    """Every discovery config of ``config``: topic -> payload (to publish as JSON, retained).

    Raises:
        ValueError: ``config`` has no ``state_topic`` (the sensors and availability need it).
    """
    if not config.state_topic:
        raise ValueError("discovery needs [mqtt] state_topic")
    state = config.state_topic.rstrip("/")
    common = {
        "availability_topic": f"{state}/status", "payload_available": "online",
        "payload_not_available": "offline",
        "device": {"identifiers": [f"edgecap_{node_id}"], "name": f"edgecap {node_id}",
                   "manufacturer": "edgecap", "model": "edgecap watch",
                   "sw_version": __version__},
        "origin": {"name": "edgecap", "sw_version": __version__},
    }
    messages: dict[str, dict[str, Any]] = {}

    def add(component: str, name: str, payload: dict[str, Any]) -> None:
        object_id, n = _slug(name), 2
        while f"{config.discovery_prefix}/{component}/{node_id}/{object_id}/config" in messages:
            object_id, n = f"{_slug(name)}_{n}", n + 1  # names that slug alike stay apart
        unique = {"unique_id": f"edgecap_{node_id}_{object_id}"}
        topic = f"{config.discovery_prefix}/{component}/{node_id}/{object_id}/config"
        messages[topic] = {**payload, **unique, **common}

    for camera in config.cameras:
        topic = f"{state}/{camera.name}/state"
        add("sensor", f"{camera.name}_caption", {
            "name": f"{camera.name} caption", "icon": "mdi:image-text",
            "state_topic": topic, "value_template": "{{ value_json.generated_text }}",
            "json_attributes_topic": topic})
    for rule in config.alerts:
        target = next((t for t in rule.targets if isinstance(t, MqttTarget)
                       and t.broker == config.mqtt), None)
        if target is None:  # Home Assistant reads one broker: the [mqtt] one
            continue
        add("event", f"{rule.name}_alert", {
            "name": f"{rule.name} alert", "icon": "mdi:bell-ring", "state_topic": target.topic,
            "event_types": [rule.name], "value_template": _event_template(rule.name)})
    return messages


def _event_template(rule: str) -> str:
    """Jinja that turns this rule's alert into an event and every other message into nothing
    (Home Assistant skips an empty rendering), since rules may share one alert topic."""
    name = json.dumps(rule)  # a JSON string is a valid Jinja string literal
    return (f"{{% if value_json.rule == {name} %}}{{{{ {{\"event_type\": {name}, "
            "\"camera\": value_json.camera, \"caption\": value_json.generated_text, "
            "\"snapshot\": value_json.snapshot} | tojson }}{% endif %}")


class Discovery:
    """Keeps ``config``'s entities announced on its ``[mqtt]`` broker until ``close()``.

    Args:
        config: a watch config with ``discovery`` on, a ``[mqtt]`` broker and ``state_topic``.
        node_id: this box (default: ``config.node_id``, else from the host name).
    """

    def __init__(self, config: WatchConfig, node_id: str | None = None):
        from paho.mqtt import client as mqtt  # the [alerts] extra

        if config.mqtt is None:
            raise ValueError("discovery needs an [mqtt] broker")
        self.node_id = node_id or config.node_id or default_node_id()
        self.messages = discovery_messages(config, self.node_id)
        self.announced = threading.Event()  # set once the broker acknowledged every config
        self._prefix = config.discovery_prefix
        self._sync = f"{SYNC_PREFIX}/{self.node_id}/{uuid.uuid4().hex}"
        self._retained: set[str] = set()
        self._unacknowledged: set[int] = set()  # message ids of this announcement
        self._announcing = False
        broker = config.mqtt
        # Never the alerts' client id: a second connection with it would cut the first off.
        client_id = f"{broker.client_id}-discovery" if broker.client_id else ""
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv311)
        if broker.username is not None:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            self._client.tls_set(ca_certs=broker.ca_file)
        self._client.reconnect_delay_set(1, max(1, int(broker.reconnect_max_s)))
        self._client.on_connect, self._client.on_message = self._on_connect, self._on_message
        self._client.on_subscribe, self._client.on_publish = self._on_subscribe, self._on_publish
        self._client.connect_async(broker.host, broker.port, broker.keepalive_s)
        self._client.loop_start()

    # paho callbacks run on paho's network thread.
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("discovery: MQTT broker refused the connection: %s", reason_code)
            return
        self.announced.clear()
        self._retained.clear()
        self._unacknowledged.clear()
        self._announcing = False
        client.subscribe([(f"{self._prefix}/+/{self.node_id}/+/config", 1), (self._sync, 1)])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        # The broker sends retained messages on subscribing, before this echo comes back.
        client.publish(self._sync, b"", qos=1)

    def _on_message(self, client, userdata, message) -> None:
        if message.topic != self._sync:
            if message.payload:
                self._retained.add(message.topic)
            return
        if self._announcing:
            return
        self._announcing = True
        published = [client.publish(topic, b"", qos=1, retain=True)  # left the config
                     for topic in sorted(self._retained - set(self.messages))]
        published += [client.publish(topic, json.dumps(payload), qos=1, retain=True)
                      for topic, payload in self.messages.items()]
        # Acknowledgements are handled on this same thread, so none has arrived yet.
        self._unacknowledged.update(info.mid for info in published)
        log.info("discovery: %d entities announced to Home Assistant as node %s",
                 len(self.messages), self.node_id)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._unacknowledged.discard(mid)
        if self._announcing and not self._unacknowledged:
            self.announced.set()

    def close(self, timeout_s: float = 2.0) -> None:
        """Disconnect, after at most ``timeout_s`` for an announcement not yet acknowledged (a
        watch on a short file may end first). The retained configs stay: Home Assistant keeps
        the entities."""
        self.announced.wait(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()
