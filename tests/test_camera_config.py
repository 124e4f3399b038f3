"""cameras.toml: a valid file loads into checked dataclasses; every mistake is one
`FILE:LINE: key: problem` ConfigError pointing at the offending line."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pytest
from edgecap.alerts.targets import CommandTarget, MqttTarget, WebhookTarget
from edgecap.watch.config import ConfigError, load_config
from edgecap.errors import EdgecapError

VALID = """\
archive = "events.db"            # relative to this file
snapshots = "snaps"
keep_days = 7

[mqtt]
host = "127.0.0.1"
port = 1884
username = "edgecap"
password_env = "EDGECAP_TEST_MQTT_PASSWORD"
state_topic = "edgecap"

[[camera]]
name = "door"
source = "rtsp://127.0.0.1:8554/door"
fps = 2
num_beams = 3
early_stopping = "never"

[[camera]]
name = "yard"
source = "/dev/video0"
changes_only = true
scene_threshold = 0.2

[[alert]]
name = "night visitor"
match = "person OR man OR woman"
cameras = ["door"]
between = ["22:00", "06:00"]
cooldown_s = 30
command = ["notify-send", "edgecap"]
mqtt = { topic = "edgecap/alerts" }
webhook = { url = "http://127.0.0.1:9000/hook", headers_file = "hook_headers", retries = 2 }

[[alert]]
regex = "\\\\bdogs?\\\\b"
webhook = "http://127.0.0.1:9000/dog"
"""


def write(tmp_path: Path, text: str, name: str = "cameras.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line number of the ``occurrence``-th line containing ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[occurrence - 1]


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert isinstance(info.value, EdgecapError)
    return str(info.value)


@pytest.fixture
def secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECAP_TEST_MQTT_PASSWORD", "s3cret")
    (tmp_path / "hook_headers").write_text("# token for the hook\nAuthorization: Bearer abc\n")


def test_valid_config_loads_with_paths_secrets_and_options(tmp_path, secrets):
    config = load_config(write(tmp_path, VALID))
    assert config.archive == tmp_path / "events.db" and config.snapshots == tmp_path / "snaps"
    assert config.keep_days == 7.0 and config.max_disk_mb is None
    assert [c.name for c in config.cameras] == ["door", "yard"]
    door, yard = config.cameras
    assert door.options == {"fps": 2.0, "num_beams": 3, "early_stopping": "never"}
    assert yard.options == {"changes_only": True, "scene_threshold": 0.2}
    assert config.mqtt.port == 1884 and config.mqtt.password == "s3cret"
    assert "s3cret" not in repr(config)  # secrets stay out of logs and tracebacks
    assert config.state_topic == "edgecap"
    night, dog = config.alerts
    assert night.name == "night visitor" and night.cameras == ("door",)
    assert night.between == (dt.time(22), dt.time(6)) and night.cooldown_s == 30
    command, mqtt, hook = night.targets
    assert isinstance(command, CommandTarget) and command.argv == ("notify-send", "edgecap")
    # the alert's mqtt table inherits the [mqtt] broker
    assert isinstance(mqtt, MqttTarget) and mqtt.broker == config.mqtt
    assert mqtt.topic == "edgecap/alerts" and mqtt.qos == 1
    assert isinstance(hook, WebhookTarget) and hook.retries == 2
    assert dict(hook.headers) == {"Authorization": "Bearer abc"}
    assert dog.regex == "\\bdogs?\\b" and dog.name == dog.regex and dog.cameras is None
    assert dog.cooldown_s == 60


def test_camera_args_overlay_the_watch_command_line(tmp_path, secrets):
    door = load_config(write(tmp_path, VALID)).cameras[0]
    base = argparse.Namespace(source=None, camera=None, fps=None, num_beams=None,
                              scene_threshold=0.08, timeout_s=5.0)
    args = door.args(base)
    assert (args.source, args.camera, args.fps, args.num_beams) == (
        "rtsp://127.0.0.1:8554/door", "door", 2.0, 3)
    assert args.scene_threshold == 0.08 and base.fps is None  # base untouched


def test_typo_key_names_file_line_key_and_suggestion(tmp_path, secrets):
    text = VALID.replace("changes_only = true", "chnges_only = true")
    message = config_error(tmp_path, text)
    path = tmp_path / "cameras.toml"
    assert message.startswith(f"{path}:{line_of(text, 'chnges_only')}: camera.chnges_only: ")
    assert "did you mean 'changes_only'" in message


def test_bad_type_names_the_line_of_the_second_camera(tmp_path, secrets):
    text = VALID.replace("scene_threshold = 0.2", 'fps = "fast"')
    message = config_error(tmp_path, text)
    # the first camera's fps is fine: the error points at the second block's line
    assert f":{line_of(text, 'fps = ', 2)}: camera.fps: expected a number" in message


def test_bounds_are_checked(tmp_path, secrets):
    message = config_error(tmp_path, VALID.replace("num_beams = 3", "num_beams = 0"))
    assert f":{line_of(VALID, 'num_beams')}: camera.num_beams: must be >= 1" in message
    message = config_error(tmp_path, VALID.replace("scene_threshold = 0.2",
                                                   "scene_threshold = 1.5"))
    assert "camera.scene_threshold: must be <= 1 (got 1.5)" in message
    message = config_error(tmp_path, VALID.replace("changes_only = true", "changes_only = 1"))
    assert "camera.changes_only: expected true or false" in message


def test_duplicate_camera_names(tmp_path, secrets):
    text = VALID.replace('name = "yard"', 'name = "door"')
    message = config_error(tmp_path, text)
    line = line_of(text, 'name = "door"', 2)
    assert f":{line}: camera.name: duplicate camera name" in message


def test_malformed_fts_query(tmp_path, secrets):
    text = VALID.replace('match = "person OR man OR woman"', 'match = "person OR"')
    message = config_error(tmp_path, text)
    assert f":{line_of(text, 'match = ')}: alert.match: fts5: syntax error" in message


def test_bad_between(tmp_path, secrets):
    text = VALID.replace('["22:00", "06:00"]', '["25:00", "06:00"]')
    message = config_error(tmp_path, text)
    assert f":{line_of(text, 'between')}: alert.between: expected a local time" in message
    text = VALID.replace('["22:00", "06:00"]', '["22:00"]')
    assert "alert.between: expected [\"start\", \"end\"]" in config_error(tmp_path, text)
    text = VALID.replace('["22:00", "06:00"]', '["22:00", "22:00"]')
    assert "alert.between: start and end are the same time" in config_error(tmp_path, text)


def test_bad_regex_unknown_camera_and_missing_target(tmp_path, secrets):
    text = VALID.replace('regex = "\\\\bdogs?\\\\b"', 'regex = "dog("')
    message = config_error(tmp_path, text)
    assert f":{line_of(text, 'regex')}: alert.regex: missing )" in message
    message = config_error(tmp_path, VALID.replace('cameras = ["door"]', 'cameras = ["dor"]'))
    assert "alert.cameras: no camera named 'dor'; did you mean 'door'?" in message
    text = VALID.replace('webhook = "http://127.0.0.1:9000/dog"', "cooldown_s = 5")
    message = config_error(tmp_path, text)
    # no key to point at: the error names the [[alert]] block's header line
    assert f":{line_of(text, '[[alert]]', 2)}: alert: no target" in message


def test_secrets_come_from_env_or_files_not_the_config(tmp_path, monkeypatch):
    (tmp_path / "hook_headers").write_text("Authorization: Bearer abc\n")
    message = config_error(tmp_path, VALID)  # EDGECAP_TEST_MQTT_PASSWORD is not set
    assert f":{line_of(VALID, 'password_env')}: mqtt.password_env: environment variable" in message
    text = VALID.replace('password_env = "EDGECAP_TEST_MQTT_PASSWORD"', 'password = "plain"')
    assert "mqtt.password: keep secrets out of the config" in config_error(tmp_path, text)
    monkeypatch.setenv("EDGECAP_TEST_MQTT_PASSWORD", "x")
    (tmp_path / "hook_headers").unlink()
    message = config_error(tmp_path, VALID)
    assert f":{line_of(VALID, 'headers_file')}: alert.webhook.headers_file: cannot read" in message


def test_inline_table_key_errors_point_at_its_line(tmp_path, secrets):
    text = VALID.replace('mqtt = { topic = "edgecap/alerts" }', 'mqtt = { topic = "a/#" }')
    message = config_error(tmp_path, text)
    assert f":{line_of(text, 'a/#')}: alert.mqtt.topic: 'a/#': a topic to publish on" in message
    text = VALID.replace("port = 1884", "port = 99999")
    assert f":{line_of(text, 'port =')}: mqtt.port: must be between 1 and 65535" in (
        config_error(tmp_path, text))


def test_toml_syntax_errors_and_missing_files(tmp_path):
    message = config_error(tmp_path, '[[camera]]\nname = "door\n')
    assert "invalid TOML" in message and "line 2" in message
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.toml")
    assert "no [[camera]] block" in config_error(tmp_path, 'archive = "a.db"\n')
    message = config_error(tmp_path, '[[camera]]\nname = "front door"\nsource = "x"\n')
    assert ":2: camera.name: 'front door': use letters" in message


def test_lanes_are_checked_like_every_declared_option(tmp_path, secrets):
    assert load_config(write(tmp_path, VALID)).lanes is None  # default: one per thread
    assert load_config(write(tmp_path, "lanes = 2\n" + VALID)).lanes == 2
    for value, problem in (("0", "must be >= 1"), ("65", "must be <= 64"),
                           ('"2"', "expected an integer"), ("1.5", "expected an integer"),
                           ("true", "expected an integer")):
        text = f"# lanes\nlanes = {value}\n" + VALID
        assert f"cameras.toml:2: lanes: {problem}" in config_error(tmp_path, text), value
    text = VALID.replace('name = "yard"', 'name = "yard"\nlanes = 2')
    assert "camera.lanes: unknown key" in config_error(tmp_path, text)  # one per file, on top


def test_lane_plan_gives_the_lanes_every_thread_and_never_exceeds_the_cameras():
    """A run computes on its lane's thread plus the sessions' pool, which the lanes share: the
    lanes and the pool together use the threads given."""
    from edgecap.watch.lanes import plan_lanes

    assert plan_lanes(None, threads=2, cameras=4) == plan_lanes(2, 2, 4)  # one lane per thread
    assert (plan_lanes(2, 2, 4).lanes, plan_lanes(2, 2, 4).threads) == (2, 1)  # no pool
    assert plan_lanes(None, threads=2, cameras=1) == plan_lanes(1, 2, 1)  # one camera: one lane
    assert plan_lanes(1, 2, 1).threads == 2
    assert (plan_lanes(None, 8, 3).lanes, plan_lanes(None, 8, 3).threads) == (3, 6)
    assert (plan_lanes(4, 2, 8).lanes, plan_lanes(4, 2, 8).threads) == (4, 1)  # at least one
    assert str(plan_lanes(2, 2, 2)) == "2 lanes, sessions of 1 thread"
