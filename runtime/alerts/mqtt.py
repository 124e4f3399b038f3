"""One MQTT broker connection for alerts and per-camera state (paho-mqtt 2.x, [alerts] extra).

paho's network thread (``loop_start``) connects, reconnects with backoff and resends QoS 1
messages that were unacknowledged when the connection dropped. Alerts wait in our own bounded
queue and are handed to paho only while connected (at most ``MAX_INFLIGHT`` unacknowledged), so
while the broker is down the queue fills, then drops, and both are counted. Camera state is
latest-wins: only the newest caption per camera waits, retained on the broker once sent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from .targets import MAX_INFLIGHT, AlertStats, Delivery, MqttBroker, MqttTarget

log = logging.getLogger("edgecap.alerts")


class MqttPublisher:
    """Publishes alerts (QoS 1) and retained state messages to one broker, from one thread.

    Args:
        broker: where to connect.
        stats: counts per camera for the ``mqtt`` target.
        capacity: alerts that may wait (broker down or slow) before new ones are dropped.
        status_topic: if set, ``online``/``offline`` is kept there (retained; ``offline`` is
            also the broker-side last will), so Home Assistant can show availability.
    """

    def __init__(self, broker: MqttBroker, stats: AlertStats, capacity: int,
                 status_topic: str | None = None):
        from paho.mqtt import client as mqtt  # the [alerts] extra, needed only for MQTT

        self.broker, self._stats, self._capacity = broker, stats, capacity
        self.status_topic = status_topic
        self._items: deque[Delivery] = deque()
        self._states: dict[str, tuple[str, bytes]] = {}  # camera -> (topic, body), newest only
        self._pending: dict[int, Delivery | None] = {}  # paho message id -> alert (None: state)
        self._acked_early: set[int] = set()  # acknowledged before publish() returned its id
        self._cond = threading.Condition()
        self._connected = self._closing = self._abort = False
        self._client = self._make_client(mqtt)
        self._thread = threading.Thread(target=self._run, name="edgecap-alerts-mqtt", daemon=True)
        self._thread.start()
        self._client.connect_async(broker.host, broker.port, broker.keepalive_s)
        self._client.loop_start()

    def _make_client(self, mqtt):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.broker.client_id,
                             protocol=mqtt.MQTTv311)
        if self.broker.username is not None:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:  # the broker's certificate and host name are verified
            client.tls_set(ca_certs=self.broker.ca_file)
        if self.status_topic:
            client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(1, max(1, int(self.broker.reconnect_max_s)))
        client.on_connect, client.on_disconnect = self._on_connect, self._on_disconnect
        client.on_publish = self._on_publish
        return client

    @property
    def connected(self) -> bool:
        """Whether the broker has accepted the connection (and not dropped it since)."""
        return self._connected

    def put(self, delivery: Delivery) -> bool:
        """Queue an alert; never blocks. False (counted as dropped) when the queue is full."""
        with self._cond:
            if not self._closing and len(self._items) < self._capacity:
                self._items.append(delivery)
                self._stats.queue(delivery)
                self._cond.notify()
                return True
        self._stats.drop(delivery.camera, "mqtt", "broker unreachable or slow, queue full")
        return False

    def put_state(self, camera: str, topic: str, body: bytes) -> None:
        """Make ``body`` the next state message of ``camera`` (replacing an unsent one)."""
        with self._cond:
            self._states[camera] = (topic, body)
            self._cond.notify()

    # paho callbacks run on paho's network thread.
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("alerts: MQTT broker %s:%d refused the connection: %s",
                        self.broker.host, self.broker.port, reason_code)
            return
        log.info("alerts: connected to MQTT broker %s:%d", self.broker.host, self.broker.port)
        if self.status_topic:
            self._track(client.publish(self.status_topic, "online", qos=1, retain=True), None)
        with self._cond:
            self._connected = True
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            was_connected, self._connected = self._connected, False
        if was_connected and not self._closing:
            log.warning("alerts: lost the MQTT broker %s:%d (%s); alerts wait in the queue",
                        self.broker.host, self.broker.port, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            if mid not in self._pending:
                self._acked_early.add(mid)
                return
            delivery = self._pending.pop(mid)
            self._cond.notify_all()
        if delivery is not None:
            self._stats.done(delivery, "failed" if reason_code.is_failure else "sent")

    def _next(self) -> tuple[str, bytes, int, bool, Delivery | None] | None:
        """Wait for something publishable: (topic, body, qos, retain, alert), None to stop."""
        with self._cond:
            while True:
                if self._abort:
                    return None
                ready = self._connected and len(self._pending) < MAX_INFLIGHT
                if ready and self._items:
                    item = self._items.popleft()
                    target = item.target
                    assert isinstance(target, MqttTarget)
                    return target.topic, item.body, target.qos, target.retain, item
                if ready and self._states:
                    topic, body = self._states.pop(next(iter(self._states)))
                    return topic, body, 1, True, None
                if self._closing and not self._items and (not self._states or not ready):
                    return None
                self._cond.wait(0.5)

    def _run(self) -> None:
        while (item := self._next()) is not None:
            topic, body, qos, retain, delivery = item
            self._track(self._client.publish(topic, body, qos=qos, retain=retain), delivery)

    def _track(self, info, delivery: Delivery | None) -> None:
        """Wait for the broker's acknowledgement of ``info``'s message (or count it now)."""
        with self._cond:
            acked = info.mid in self._acked_early  # paho acknowledged it before we got here
            if acked:
                self._acked_early.discard(info.mid)
            else:  # sent now, or resent by paho after a reconnect
                self._pending[info.mid] = delivery
        if acked and delivery is not None:
            self._stats.done(delivery, "sent")

    def close(self, deadline: float) -> None:
        """Publish what waits and collect acknowledgements until ``deadline`` (monotonic), then
        disconnect; alerts still unacknowledged are counted as dropped."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._abort = True
            self._cond.notify_all()
            while self._pending and self._connected and time.monotonic() < deadline:
                self._cond.wait(max(0.01, deadline - time.monotonic()))
            leftover = list(self._items) + [d for d in self._pending.values() if d is not None]
            self._items.clear()
            self._pending.clear()
        for delivery in leftover:
            self._stats.done(delivery, "dropped")
        if leftover:
            log.warning("alerts: %d MQTT alert(s) undelivered at exit", len(leftover))
        self._disconnect()

    def _disconnect(self) -> None:
        if self.status_topic and self._connected:
            info = self._client.publish(self.status_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(1.0)
            except (RuntimeError, ValueError):  # lost the broker meanwhile: the will says it
                pass
        self._client.disconnect()
        self._client.loop_stop()
