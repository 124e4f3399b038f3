"""Home Assistant MQTT discovery (`discovery = true` in [mqtt]): a real mosquitto receives valid
retained configs (a caption sensor per camera, an event per alert rule, one device, the status
topic as availability), and a camera that leaves the config has its config removed."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

pytest.importorskip("paho.mqtt")

from edgecap.watch.config import ConfigError, load_config
from edgecap.watch.ha_discovery import Discovery, discovery_messages
from test_alerts import MOSQUITTO, Broker

needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None, reason="needs Debian's mosquitto broker (apt-get install mosquitto)")

CONFIG = """\
[mqtt]
port = {port}
state_topic = "edgecap"
topic = "edgecap/alerts"
discovery = true
node_id = "box1"

{cameras}

[[alert]]
name = "person at night"
match = "person OR man"
mqtt = true

[[alert]]
name = "dog"
regex = "dog"
command = ["true"]
"""
CAMERA = '[[camera]]\nname = "{name}"\nsource = "rtsp://127.0.0.1:8554/{name}"\n'


def write_config(tmp_path: Path, port: int, cameras: list[str], name: str) -> Path:
    path = tmp_path / name
    blocks = "\n".join(CAMERA.format(name=camera) for camera in cameras)
    path.write_text(CONFIG.format(port=port, cameras=blocks))
    return path


def retained_configs(port: int, settle_s: float = 1.0) -> dict[str, dict]:
    """The retained discovery configs on the broker now (a fresh subscriber's view)."""
    from paho.mqtt import client as mqtt

    found: dict[str, dict] = {}
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("homeassistant/#", qos=1)
    client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    client.on_message = lambda c, u, m: found.__setitem__(m.topic, json.loads(m.payload))
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert subscribed.wait(5)
    threading.Event().wait(settle_s)  # retained messages arrive right after the subscription
    client.disconnect()
    client.loop_stop()
    return found


def test_messages_are_valid_discovery_configs(tmp_path):
    config = load_config(write_config(tmp_path, 1883, ["door", "yard.back"], "c.toml"))
    messages = discovery_messages(config, "box1")
    assert set(messages) == {"homeassistant/sensor/box1/door_caption/config",
                             "homeassistant/sensor/box1/yard_back_caption/config",
                             "homeassistant/event/box1/person_at_night_alert/config"}
    door = messages["homeassistant/sensor/box1/door_caption/config"]
    assert door["state_topic"] == "edgecap/door/state"
    assert door["availability_topic"] == "edgecap/status"
    assert door["unique_id"] == "edgecap_box1_door_caption"
    devices = {json.dumps(m["device"], sort_keys=True) for m in messages.values()}
    assert len(devices) == 1  # one device per box


def test_event_template_renders_only_its_rule():
    jinja2 = pytest.importorskip("jinja2")
    from edgecap.watch.ha_discovery import _event_template

    env = jinja2.Environment()
    env.filters["tojson"] = json.dumps  # Home Assistant's tojson filter
    template = env.from_string(_event_template('person "at" night'))
    alert = {"rule": 'person "at" night', "camera": "door", "generated_text": "a man",
             "snapshot": None}
    event = json.loads(template.render(value_json=alert))
    assert event == {"event_type": 'person "at" night', "camera": "door", "caption": "a man",
                     "snapshot": None}
    assert template.render(value_json={**alert, "rule": "dog"}).strip() == ""


def test_discovery_needs_the_state_topic(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[mqtt]\ndiscovery = true\n\n' + CAMERA.format(name="door"))
    with pytest.raises(ConfigError, match="discovery: needs state_topic"):
        load_config(path)


@needs_mosquitto
def test_announced_to_mosquitto_and_removed_when_a_camera_goes(tmp_path):
    broker = Broker(tmp_path)
    broker.start()
    try:
        first = load_config(write_config(tmp_path, broker.port, ["door", "yard"], "a.toml"))
        discovery = Discovery(first)
        assert discovery.announced.wait(10)
        discovery.close()
        configs = retained_configs(broker.port)
        assert set(configs) == set(discovery_messages(first, "box1"))
        yard = configs["homeassistant/sensor/box1/yard_caption/config"]
        assert yard["state_topic"] == "edgecap/yard/state" and yard["device"]["identifiers"]
        event = configs["homeassistant/event/box1/person_at_night_alert/config"]
        assert event["state_topic"] == "edgecap/alerts"
        assert event["event_types"] == ["person at night"]

        # The yard camera leaves the config: its sensor's retained config is deleted.
        second = load_config(write_config(tmp_path, broker.port, ["door"], "b.toml"))
        discovery = Discovery(second)
        assert discovery.announced.wait(10)
        discovery.close()
        configs = retained_configs(broker.port)
        assert set(configs) == set(discovery_messages(second, "box1"))
        assert "homeassistant/sensor/box1/yard_caption/config" not in configs
    finally:
        broker.stop()


def retained_payload(port: int, topic: str) -> bytes:
    """The retained message on ``topic``."""
    from paho.mqtt import subscribe

    return subscribe.simple(topic, hostname="127.0.0.1", port=port, retained=True,
                            keepalive=5, msg_count=1).payload


@needs_mosquitto
def test_watch_config_announces_and_its_sensor_topic_holds_the_caption(tmp_path, photos,
                                                                        tiny_export):
    pytest.importorskip("av")
    from edgecap.cli.main import main
    from test_watch import encode_video

    broker = Broker(tmp_path)
    broker.start()
    try:
        video = tmp_path / "door.mp4"
        encode_video(video, photos[:1], seconds=1.0)
        path = tmp_path / "cameras.toml"
        path.write_text(CONFIG.format(port=broker.port, cameras=CAMERA.format(name="door"))
                        .replace("rtsp://127.0.0.1:8554/door", str(video)))
        assert main(["watch", "--config", str(path), "--model", str(tiny_export),
                     "--out", str(tmp_path / "out.jsonl")]) == 0
        configs = retained_configs(broker.port)
        sensor = configs["homeassistant/sensor/box1/door_caption/config"]
        # The sensor's topics hold what it shows: the last caption, and the watcher's status.
        state = json.loads(retained_payload(broker.port, sensor["state_topic"]))
        records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert state["generated_text"] == records[-1]["generated_text"]
        assert retained_payload(broker.port, sensor["availability_topic"]) == b"offline"
    finally:
        broker.stop()
