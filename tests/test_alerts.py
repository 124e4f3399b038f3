"""Alert rules over captions, delivered to real targets: a mosquitto broker started here on a
loopback port, an HTTP receiver on 127.0.0.1 and subprocess commands. Every wait is bounded."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from edgecap.alerts.rules import AlertRule, Alerts, CommandTarget, MqttBroker, MqttTarget, WebhookTarget
from edgecap.watch.metrics import CameraMetrics, start_metrics_server

MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None, reason="needs Debian's mosquitto broker (apt-get install mosquitto)")


def record(text: str, camera: str = "door", at: dt.datetime | None = None,
           frame: int = 0) -> dict:
    """A watch record as the watcher emits it, captioned at local time ``at`` (default now)."""
    at = (at or dt.datetime.now()).astimezone()
    return {"source": camera, "status": "ok", "generated_text": text, "score": -0.42,
            "token_ids": [1, 2], "latency_ms": 50.0, "stream_time": 12.5 + frame,
            "wall_time": at.astimezone(dt.timezone.utc).isoformat(), "frame_index": frame,
            "dropped": 0, "reason": "scene", "camera": camera, "snapshot": f"/snaps/{frame}.jpg"}


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Hook:
    """A webhook receiver on 127.0.0.1: answers each POST with the next status of ``statuses``
    (then 200), keeps the JSON bodies of the 200s."""

    def __init__(self, statuses: list[int] = ()):
        self.statuses, self.bodies, self.attempts = list(statuses), [], 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.attempts += 1
                status = hook.statuses.pop(0) if hook.statuses else 200
                if status == 200:
                    hook.bodies.append((json.loads(body), self.headers.get("Authorization")))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    server = Hook()
    yield server
    server.close()


def webhook(url: str) -> WebhookTarget:
    return WebhookTarget(url, timeout_s=2.0, retries=2, backoff_s=0.05)


# ---- rule matching ------------------------------------------------------------------------

def fired(rule: AlertRule, records: list[dict]) -> list[list[str]]:
    with Alerts([rule]) as alerts:
        return [alerts.offer(r) for r in records]


SINK = (CommandTarget(("true",)),)


@pytest.mark.parametrize("query, caption, hit", [
    ('"red car"', "a red car parked on a street", True),
    ('"red car"', "a car that is red", False),
    ("person OR dog", "a dog on a couch", True),
    ("person OR dog", "a cat on a couch", False),
    ("dog NOT cat", "a dog and a cat", False),
    ("dog NOT cat", "two dogs playing", True),  # porter stemming, like the archive
    ("pers*", "a person walks by", True),
    ("caption:truck", "a truck at the gate", True),
])
def test_fts_rules_match_like_the_archive_search(query, caption, hit):
    rule = AlertRule(match=query, targets=SINK, cooldown_s=0)
    assert fired(rule, [record(caption)]) == [[query] if hit else []]


def test_regex_cameras_and_time_window_across_midnight():
    rule = AlertRule(name="dog", regex=r"\bdogs?\b", cameras=("yard",), targets=SINK,
                     between=(dt.time(22), dt.time(6)), cooldown_s=0)
    night, late, day = (dt.datetime(2026, 1, 1, 23, 30), dt.datetime(2026, 1, 2, 5, 59),
                        dt.datetime(2026, 1, 2, 6, 0))
    results = fired(rule, [record("A Dog barks", "yard", night), record("dogs", "yard", late),
                           record("a dog", "yard", day), record("a dog", "door", night),
                           record("a hotdog stand", "yard", night)])
    assert results == [["dog"], ["dog"], [], [], []]
    evening = AlertRule(match="car", between=(dt.time(18), dt.time(20)), targets=SINK)
    assert fired(evening, [record("a car", at=dt.datetime(2026, 1, 1, 19)),
                           record("a car", at=dt.datetime(2026, 1, 1, 21))]) == [["car"], []]


def test_cooldown_sends_exactly_one_message_per_event(hook):
    rule = AlertRule(name="person", match="person", cooldown_s=60, targets=(webhook(hook.url),))
    start = dt.datetime(2026, 1, 1, 12)
    # one event on the door: a match every 20 s for two minutes (each extends the event),
    # one on the yard at the same time, then the door again after a quiet gap of 90 s
    frames = [record("a person at the door", "door", start + dt.timedelta(seconds=20 * i), i)
              for i in range(7)]
    frames.append(record("a person in the yard", "yard", start))
    frames.append(record("an empty porch", "door", start + dt.timedelta(seconds=150)))
    frames.append(record("a person again", "door", start + dt.timedelta(seconds=210), 9))
    with Alerts([rule]) as alerts:
        results = [alerts.offer(r) for r in frames]
        assert wait_for(lambda: len(hook.bodies) == 3)
    assert [bool(r) for r in results] == [True] + [False] * 6 + [True, False, True]
    assert sorted((b["camera"], b["frame_index"]) for b, _ in hook.bodies) == [
        ("door", 0), ("door", 9), ("yard", 0)]
    assert alerts.stats()["door"]["webhook"] == {"sent": 2, "dropped": 0, "failed": 0,
                                                 "queued": 0}


# ---- webhook and command targets ----------------------------------------------------------

def test_webhook_gets_payload_and_a_failing_one_is_retried():
    hook = Hook(statuses=[500])
    target = WebhookTarget(hook.url, headers=(("Authorization", "Bearer t0k"),), retries=2,
                           backoff_s=0.05, timeout_s=2.0)
    try:
        with Alerts([AlertRule(name="cat", match="cat", targets=(target,))]) as alerts:
            alerts.offer(record("a tabby cat looks at the camera", frame=3))
            assert wait_for(lambda: hook.bodies)
        body, auth = hook.bodies[0]
    finally:
        hook.close()
    assert hook.attempts == 2 and auth == "Bearer t0k"
    assert body == {"camera": "door", "generated_text": "a tabby cat looks at the camera",
                    "stream_time": 15.5, "wall_time": body["wall_time"], "frame_index": 3,
                    "score": -0.42, "tags": None, "snapshot": "/snaps/3.jpg", "rule": "cat"}
    assert alerts.stats()["door"]["webhook"]["sent"] == 1


def test_webhook_that_keeps_failing_counts_as_failed(caplog):
    hook = Hook(statuses=[500, 503, 500])
    try:
        rule = AlertRule(match="cat", targets=(webhook(hook.url),))
        with caplog.at_level(logging.WARNING, logger="edgecap.alerts"), Alerts([rule]) as alerts:
            alerts.offer(record("a cat"))
            assert wait_for(lambda: alerts.stats()["door"]["webhook"]["failed"] == 1)
    finally:
        hook.close()
    assert hook.attempts == 3 and hook.bodies == []
    assert "HTTP 500 (after 3 attempt(s))" in caplog.text


def test_command_gets_the_record_on_stdin_and_a_failing_one_is_not_fatal(tmp_path, caplog):
    out = tmp_path / "alert.json"
    write = CommandTarget((sys.executable, "-c",
                           f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"))
    fail = CommandTarget((sys.executable, "-c", "import sys; sys.exit('boom')"))
    missing = CommandTarget((str(tmp_path / "no-such-command"),))
    rules = [AlertRule(name="bad", match="truck", targets=(fail, missing)),
             AlertRule(name="good", match="truck", targets=(write,))]
    with caplog.at_level(logging.WARNING, logger="edgecap.alerts"), Alerts(rules) as alerts:
        assert alerts.offer(record("a truck at the gate")) == ["bad", "good"]
        assert wait_for(lambda: alerts.stats()["door"]["command"]["queued"] == 0)
    payload = json.loads(out.read_text())
    assert payload["rule"] == "good" and payload["generated_text"] == "a truck at the gate"
    assert alerts.stats()["door"]["command"] == {"sent": 1, "dropped": 0, "failed": 2,
                                                 "queued": 0}
    assert "exit status 1: boom" in caplog.text and "no-such-command" in caplog.text


def test_offer_never_blocks_when_every_target_is_stuck(tmp_path):
    # a webhook and an "MQTT broker" that accept connections and never answer, a command
    # that hangs: offer() must return at once, and what the queues cannot hold is dropped
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    stuck = (CommandTarget((sys.executable, "-c", "import time; time.sleep(30)"), timeout_s=20),
             WebhookTarget(f"http://127.0.0.1:{port}/hook", timeout_s=20, retries=0),
             MqttTarget(MqttBroker(port=port), topic="edgecap/alerts"))
    alerts = Alerts([AlertRule(match="person", cooldown_s=0, targets=stuck)], queue_size=5,
                    state_broker=MqttBroker(port=port), state_topic_prefix="edgecap")
    try:
        started = time.perf_counter()
        slowest = 0.0
        for i in range(300):
            before = time.perf_counter()
            alerts.offer(record("a person", frame=i))
            slowest = max(slowest, time.perf_counter() - before)
        elapsed = time.perf_counter() - started
        stats = alerts.stats()["door"]
    finally:
        began = time.perf_counter()
        alerts.close(timeout=0.5)
        close_s = time.perf_counter() - began
        silent.close()
    assert elapsed < 3.0 and slowest < 0.5, (elapsed, slowest)
    for kind in ("command", "webhook", "mqtt"):
        # at most queue_size wait (plus one in progress); the rest were counted as dropped
        assert stats[kind]["sent"] == 0 and stats[kind]["dropped"] >= 300 - 6, (kind, stats)
    assert close_s < 5.0
    # closing killed the hung command; nothing is left counted as waiting
    assert wait_for(lambda: all(s["queued"] == 0 for s in alerts.stats()["door"].values()), 3)


# ---- MQTT against a real mosquitto --------------------------------------------------------

class Broker:
    """mosquitto on a free loopback port; persistence keeps subscriptions across restarts."""

    def __init__(self, folder: Path):
        self.port, self.folder = free_port(), folder
        self.conf = folder / "mosquitto.conf"
        # user: mosquitto started as root would drop to user "mosquitto", which cannot write
        # the persistence file into pytest's private tmp folder
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             f"user {getpass.getuser()}\npersistence true\n"
                             f"persistence_location {folder}/\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def accepting() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False
        assert wait_for(accepting, 5.0), "mosquitto did not start"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def broker(tmp_path):
    server = Broker(tmp_path)
    server.start()
    yield server
    server.stop()


class Subscriber:
    """A paho client subscribed at QoS 1 with a persistent session (survives a restart)."""

    def __init__(self, port: int, topic: str):
        from paho.mqtt import client as mqtt

        self.messages: list = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edgecap-test-sub",
                                  clean_session=False)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = lambda c, u, message: self.messages.append(message)
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def payloads(self) -> list[dict]:
        return [json.loads(m.payload) for m in self.messages]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@needs_mosquitto
def test_mqtt_alert_payload_qos1_and_retained_camera_state(broker):
    sub = Subscriber(broker.port, "edgecap/#")
    target = MqttTarget(MqttBroker(port=broker.port), topic="edgecap/alerts")
    try:
        with Alerts([AlertRule(name="person", match="person", targets=(target,))],
                    state_broker=MqttBroker(port=broker.port),
                    state_topic_prefix="edgecap") as alerts:
            assert wait_for(lambda: alerts.connected, 5)
            alerts.offer(record("a person at the door", frame=7))
            alerts.offer(record("an empty yard", camera="yard"))
            assert wait_for(lambda: any(m.topic == "edgecap/alerts" for m in sub.messages))
            assert wait_for(lambda: {m.topic for m in sub.messages} >= {
                "edgecap/door/state", "edgecap/yard/state"})
    finally:
        sub.close()
    alert = next(m for m in sub.messages if m.topic == "edgecap/alerts")
    assert alert.qos == 1
    payload = json.loads(alert.payload)
    assert payload["rule"] == "person" and payload["camera"] == "door"
    assert payload["generated_text"] == "a person at the door" and payload["frame_index"] == 7
    assert payload["snapshot"] == "/snaps/7.jpg" and payload["stream_time"] == 19.5
    assert payload["wall_time"] and payload["score"] == -0.42
    assert alerts.stats()["door"]["mqtt"]["sent"] == 1
    # the state is retained: a client that subscribes later (Home Assistant) gets it at once
    from paho.mqtt import subscribe

    retained = subscribe.simple("edgecap/yard/state", qos=1, hostname="127.0.0.1",
                                port=broker.port, retained=True, keepalive=5)
    assert json.loads(retained.payload)["generated_text"] == "an empty yard" and retained.retain
    status = subscribe.simple("edgecap/status", hostname="127.0.0.1", port=broker.port)
    assert status.payload == b"offline"  # said on close, retained


@needs_mosquitto
def test_broker_down_alerts_queue_and_count_then_delivery_resumes(broker):
    sub = Subscriber(broker.port, "edgecap/alerts")
    target = MqttTarget(MqttBroker(port=broker.port, reconnect_max_s=1), topic="edgecap/alerts")
    rule = AlertRule(match="person", cooldown_s=0, targets=(target,))
    alerts = Alerts([rule], queue_size=3)
    try:
        assert wait_for(lambda: alerts.connected, 5)
        alerts.offer(record("a person", frame=0))
        assert wait_for(lambda: alerts.stats()["door"]["mqtt"]["sent"] == 1)
        broker.stop()
        assert wait_for(lambda: not alerts.connected, 5)
        for frame in range(1, 6):  # three wait in the queue, two overflow it
            alerts.offer(record("a person", frame=frame))
        assert alerts.stats()["door"]["mqtt"] == {"sent": 1, "dropped": 2, "failed": 0,
                                                  "queued": 3}
        broker.start()
        assert wait_for(lambda: alerts.stats()["door"]["mqtt"]["sent"] == 4, 15)
        assert wait_for(lambda: len(sub.messages) >= 4, 10)
    finally:
        alerts.close(timeout=2)
        sub.close()
    assert sorted({p["frame_index"] for p in sub.payloads()}) == [0, 1, 2, 3]
    assert alerts.stats()["door"]["mqtt"]["queued"] == 0


# ---- metrics ------------------------------------------------------------------------------

def test_metrics_per_camera_include_alert_counts(hook):
    metrics = CameraMetrics(["door", "yard"])
    with Alerts([AlertRule(match="cat", targets=(webhook(hook.url),))]) as alerts:
        metrics.track_alerts(alerts)
        metrics.caption("door", dropped=3)
        metrics.reconnect("yard")
        alerts.offer(record("a cat"))
        assert wait_for(lambda: hook.bodies)
        assert wait_for(lambda: alerts.stats()["door"]["webhook"]["sent"] == 1)
        port = free_port()
        server, _ = start_metrics_server(metrics, port)
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        finally:
            server.shutdown()
    text = text.decode()
    assert 'edgecap_captions_total{camera="door"} 1.0' in text
    assert 'edgecap_captions_total{camera="yard"} 0.0' in text
    assert 'edgecap_frames_dropped_total{camera="door"} 3.0' in text
    assert 'edgecap_reconnects_total{camera="yard"} 1.0' in text
    assert 'edgecap_alerts_sent_total{camera="door",target="webhook"} 1.0' in text
    assert 'edgecap_alerts_dropped_total{camera="door",target="webhook"} 0.0' in text
