"""MQTT alert targets over TLS: `tls` / `ca_file` in the config, and a real mosquitto listening
with a self-signed certificate made here by openssl (skipped without mosquitto or openssl)."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from edgecap.alerts.targets import AlertStats, MqttBroker
from edgecap.watch.config import load_config
from edgecap.errors import EdgecapError

MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def write_config(folder: Path, mqtt: str) -> Path:
    path = folder / "cameras.toml"
    path.write_text(f'[mqtt]\n{mqtt}\n\n[[camera]]\nname = "door"\nsource = "door.mp4"\n')
    return path


def test_tls_and_ca_file_in_the_config(tmp_path):
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    broker = load_config(write_config(tmp_path, 'host = "mqtt.lan"\nca_file = "ca.pem"')).mqtt
    assert broker.tls and broker.ca_file == str(tmp_path / "ca.pem")  # relative to the config
    assert load_config(write_config(tmp_path, "tls = true")).mqtt.ca_file is None  # system CAs
    assert not load_config(write_config(tmp_path, 'host = "h"')).mqtt.tls
    with pytest.raises(EdgecapError, match="ca_file: no such file"):
        load_config(write_config(tmp_path, 'ca_file = "missing.pem"'))


def make_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "broker.pem", folder / "broker.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(MOSQUITTO is None or shutil.which("openssl") is None,
                    reason="needs mosquitto and openssl")
def test_publisher_connects_to_a_tls_broker_only_when_it_trusts_it(tmp_path):
    pytest.importorskip("paho.mqtt")
    from edgecap.alerts.mqtt import MqttPublisher

    cert, key = make_certificate(tmp_path)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n"
                    f"allow_anonymous true\nuser {getpass.getuser()}\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        trusted = MqttPublisher(MqttBroker(port=port, tls=True, ca_file=str(cert)),
                                AlertStats(), capacity=4)
        untrusted = MqttPublisher(MqttBroker(port=port, tls=True), AlertStats(), capacity=4)
        deadline = time.monotonic() + 10
        while not trusted.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert trusted.connected
        assert not untrusted.connected  # the system CAs do not vouch for a self-signed broker
        for publisher in (trusted, untrusted):
            publisher.close(time.monotonic() + 1)
    finally:
        broker.terminate()
        broker.wait(5)
