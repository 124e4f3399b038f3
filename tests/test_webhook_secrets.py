"""Webhook secrets: a redirect never carries them on, logs never show them, the config refuses
them inline, and files that other users can read get a warning. Real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import logging
import threading
import time
from pathlib import Path

import pytest

from edgecap.alerts.targets import AlertStats, Delivery, DeliveryError, DeliveryQueue
from edgecap.alerts.targets import WebhookTarget, post_webhook
from edgecap.watch.config import ConfigError, load_config
from edgecap.secret_files import redact_url
from test_server import free_port

SECRET = "Bearer s3cret-" + "f" * 24


class Recorder:
    """An HTTP server on 127.0.0.1 that records what it receives and answers ``status`` (with a
    ``Location`` when ``redirect_to`` is given)."""

    def __init__(self, status: int = 200, redirect_to: str | None = None):
        self.requests: list[tuple[str, dict[str, str]]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                recorder.requests.append((self.path, dict(self.headers)))
                self.send_response(status)
                if redirect_to:
                    self.send_header("Location", redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def deliver(url: str, **target) -> None:
    hook = WebhookTarget(url, headers=(("Authorization", SECRET),), retries=0, **target)
    post_webhook(Delivery(hook, "door", b'{"caption": "a man"}'), threading.Event())


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_never_carries_the_secret(status):
    second = Recorder()
    first = Recorder(status, redirect_to=second.url)
    try:
        with pytest.raises(DeliveryError, match="redirects are not followed") as caught:
            deliver(first.url)
        assert [headers["Authorization"] for _, headers in first.requests] == [SECRET]
        assert second.requests == []  # the second host received nothing, so no secret
        assert SECRET not in str(caught.value)
    finally:
        first.close()
        second.close()


def test_failed_deliveries_log_no_credentials(caplog):
    port = free_port()  # nothing listens there: every attempt fails
    url = f"http://127.0.0.1:{port}/hook?token=t0ken-value&camera=door"
    assert redact_url(url) == f"http://127.0.0.1:{port}/hook?..."
    assert redact_url("https://user:pa55@hooks.example/x#frag") == "https://hooks.example/x"
    stats = AlertStats()
    queue = DeliveryQueue("webhook", post_webhook, stats, capacity=4)
    hook = WebhookTarget(url, headers=(("Authorization", SECRET),), retries=0, timeout_s=2)
    with caplog.at_level(logging.WARNING, logger="edgecap.alerts"):
        queue.put(Delivery(hook, "door", b"{}"))
        queue.close(deadline=time.monotonic() + 30)
    assert stats.snapshot()["door"]["webhook"]["failed"] == 1
    assert f"127.0.0.1:{port}/hook" in caplog.text
    assert "t0ken-value" not in caplog.text and SECRET not in caplog.text


def test_user_info_in_a_url_is_redacted_from_errors():
    port = free_port()
    with pytest.raises(DeliveryError) as caught:
        deliver(f"http://edgecap:pa55word@127.0.0.1:{port}/hook", timeout_s=2)
    assert "pa55word" not in str(caught.value) and "edgecap:" not in str(caught.value)


HOOK = """\
[[camera]]
name = "door"
source = "rtsp://127.0.0.1:8554/door"

[[alert]]
match = "person"
webhook = {webhook}
"""


def config(tmp_path: Path, webhook: str, mode: int = 0o600) -> Path:
    path = tmp_path / "cameras.toml"
    path.write_text(HOOK.format(webhook=webhook))
    path.chmod(mode)
    return path


@pytest.mark.parametrize("webhook, problem", [
    ('{ url = "http://127.0.0.1:9000/h", headers = { Authorization = "Bearer x" } }',
     "Authorization: keep secrets out of the config"),
    ('{ url = "http://127.0.0.1:9000/h", headers = { X-Api-Key = "x" } }', "X-Api-Key"),
    ('"http://user:pw@127.0.0.1:9000/h"', "user info"),
    ('{ url = "http://127.0.0.1:9000/h?token=abc" }', "query parameter 'token'"),
])
def test_inline_secrets_are_refused(tmp_path, webhook, problem):
    with pytest.raises(ConfigError, match="keep secrets out of the config") as caught:
        load_config(config(tmp_path, webhook))
    assert problem in str(caught.value)
    assert "Bearer x" not in str(caught.value) and "pw@" not in str(caught.value)


def test_url_and_headers_from_env_and_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGECAP_TEST_HOOK_URL", "https://hooks.example/h?token=abc")
    (tmp_path / "hook_headers").write_text(f"Authorization: {SECRET}\n")
    (tmp_path / "hook_headers").chmod(0o600)
    (tmp_path / "hook_url").write_text("https://u:p@hooks.example/other\n")
    (tmp_path / "hook_url").chmod(0o600)
    loaded = load_config(config(tmp_path, '{ url_env = "EDGECAP_TEST_HOOK_URL", '
                                          'headers_file = "hook_headers" }'))
    hook = loaded.alerts[0].targets[0]
    assert hook.url == "https://hooks.example/h?token=abc"
    assert hook.headers == (("Authorization", SECRET),)
    loaded = load_config(config(tmp_path, '{ url_file = "hook_url" }'))
    assert loaded.alerts[0].targets[0].url == "https://u:p@hooks.example/other"
    assert "warning" not in capsys.readouterr().err  # every file is 0600


def test_readable_secret_files_warn_and_bad_lines_are_not_echoed(tmp_path, capsys):
    headers = tmp_path / "hook_headers"
    headers.write_text(f"Authorization: {SECRET}\n")
    headers.chmod(0o644)
    load_config(config(tmp_path, '{ url = "http://127.0.0.1:9000/h", '
                                 'headers_file = "hook_headers" }', mode=0o640))
    err = capsys.readouterr().err
    assert f"config file {tmp_path / 'cameras.toml'} is readable by other users" in err
    assert f"{headers} is readable by other users" in err
    headers.write_text(f"Authorization {SECRET}\n")  # the colon forgotten
    with pytest.raises(ConfigError, match="line 1: expected 'Name: value'") as caught:
        load_config(config(tmp_path, '{ url = "http://127.0.0.1:9000/h", '
                                     'headers_file = "hook_headers" }'))
    assert SECRET not in str(caught.value)
