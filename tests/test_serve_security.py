"""`edgecap serve` hardening: API keys, Host/Origin checks, headers, slow bodies, TLS, unsafe binds.

Live checks run a real server on 127.0.0.1 and talk to it with urllib and raw sockets.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from edgecap.cli import main  # noqa: E402
from edgecap.serve_security import (  # noqa: E402
    Guard,
    Policy,
    SecurityConfigError,
    UnsafeBind,
    bind_policy,
    load_api_keys,
)

from test_serve_archive import archive_db  # noqa: E402, F401 - the fixture, shared
from test_server import Server, free_port, request  # noqa: E402

KEY = "k3y-" + "0123456789abcdef" * 2
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"# edgecap keys\n\n{KEY}\n{'b' * 32}\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def keyed(tiny_export, key_file, archive_db):  # noqa: F811 - archive_db is the fixture
    srv = Server(tiny_export, "--api-key-file", str(key_file), "--archive", str(archive_db),
                 "--timeout-s", "2")
    yield srv
    assert srv.stop() == 0


# --- configuration, no server -------------------------------------------------------------------

def test_key_file_and_environment(tmp_path, key_file):
    assert load_api_keys(key_file, {}) == (KEY, "b" * 32)
    assert load_api_keys(None, {"EDGECAP_API_KEY": "e" * 20}) == ("e" * 20,)
    short = tmp_path / "short"
    short.write_text("hunter2\n")
    with pytest.raises(SecurityConfigError, match=f"{short}:1: .*at least 16"):
        load_api_keys(short, {})
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(SecurityConfigError, match="no API key"):
        load_api_keys(empty, {})
    with pytest.raises(SecurityConfigError, match="cannot read"):
        load_api_keys(tmp_path / "missing", {})


def test_bind_policy_refuses_open_network_binds():
    with pytest.raises(UnsafeBind, match="--api-key-file"):
        bind_policy("0.0.0.0", (), no_auth=False, extra_hosts=None)
    with pytest.raises(UnsafeBind, match="contradicts"):
        bind_policy("0.0.0.0", (KEY,), no_auth=True, extra_hosts=None)
    assert bind_policy("0.0.0.0", (), no_auth=True, extra_hosts=None).allowed_hosts is None
    assert bind_policy("0.0.0.0", (KEY,), False, ["Cam.Local"]).allowed_hosts[-1] == "cam.local"
    assert "localhost" in bind_policy("127.0.0.1", (), False, None).allowed_hosts


def scope(path: str = "/v1/captions", **headers: str) -> dict:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "path": path, "scheme": "http", "headers": raw}


def test_guard_decisions():
    guard = Guard(None, Policy(api_keys=(KEY,), allowed_hosts=("127.0.0.1", "::1")))
    ok = {"host": "127.0.0.1:8000", "authorization": f"Bearer {KEY}"}
    assert guard.check(scope(**ok)) is None
    assert guard.check(scope(**{**ok, "authorization": f"bearer  {KEY} "})) is None
    assert guard.check(scope(**{**ok, "host": "[::1]:8000"})) is None
    assert guard.check(scope(**{**ok, "origin": "http://127.0.0.1:8000"})) is None
    assert guard.check(scope("/healthz", host="127.0.0.1")) is None  # probes need no key
    refused = {
        "no key": scope(host="127.0.0.1"),
        "wrong key": scope(host="127.0.0.1", authorization=f"Bearer {KEY[:-1]}x"),
        "basic": scope(host="127.0.0.1", authorization=f"Basic {KEY}"),
        "empty": scope(host="127.0.0.1", authorization="Bearer "),
        "rebinding": scope(**{**ok, "host": "evil.example:8000"}),
        "cross-site": scope(**{**ok, "origin": "http://evil.example"}),
        "other port": scope(**{**ok, "origin": "http://127.0.0.1:3000"}),
        "null origin": scope(**{**ok, "origin": "null"}),
        "unknown path": scope("/admin", host="127.0.0.1"),
    }
    statuses = {name: guard.check(s)[0] for name, s in refused.items()}
    assert statuses == {"no key": 401, "wrong key": 401, "basic": 401, "empty": 401,
                        "rebinding": 421, "cross-site": 403, "other port": 403,
                        "null origin": 403, "unknown path": 401}


def test_cli_refuses_before_binding(capsys, tmp_path):
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--api-key-file" in err and "Traceback" not in err
    assert main(["serve", "--api-key-file", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgecap: error:") and "cannot read" in err and "\n" not in err
    assert main(["serve", "--tls-cert", str(tmp_path / "cert.pem")]) == 1
    assert "both --tls-cert and --tls-key" in capsys.readouterr().err


# --- a live server with keys ----------------------------------------------------------------------

def test_keys_guard_the_api_and_leave_probes_open(keyed, flickr_images):
    image = flickr_images[0].read_bytes()
    for headers in ({}, {"Authorization": "Bearer " + "x" * 32}, {"Authorization": f"Basic {KEY}"}):
        status, body, head = request(keyed.url + "/v1/captions", image, headers)
        assert status == 401 and body["error"] == "unauthorized", (headers, body)
        assert head["www-authenticate"].startswith("Bearer")
    status, body, head = request(keyed.url + "/v1/captions", image, AUTH)
    assert status == 200 and body["generated_text"], body
    assert head["cache-control"] == "no-store" and head["x-content-type-options"] == "nosniff"
    assert "server" not in {k.lower() for k in head}  # no version banner
    second = {"Authorization": "Bearer " + "b" * 32}  # every key in the file works
    assert request(keyed.url + "/v1/captions", image, second)[0] == 200
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics", "/"):
        assert request(keyed.url + path)[0] == 200, path
    _, text, _ = request(keyed.url + "/metrics")
    assert 'edgecap_errors_total{kind="unauthorized"} 3.0' in text


def test_keys_guard_the_archive(keyed):
    assert request(keyed.url + "/v1/events?q=man")[0] == 401
    assert request(keyed.url + "/v1/snapshots/1")[0] == 401
    status, body, _ = request(keyed.url + "/v1/events?q=cat&frames=true", headers=AUTH)
    assert status == 200, body
    status, _, head = request(keyed.url + body["hits"][0]["snapshot_url"], headers=AUTH)
    assert status == 200 and head["content-type"] == "image/jpeg"
    assert head["cache-control"].startswith("private")  # the route's own caching is kept


def test_openapi_declares_the_key(keyed):
    spec = request(keyed.url + "/openapi.json")[1]
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/captions"]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_host_and_origin_checks(keyed, flickr_images):
    image = flickr_images[0].read_bytes()
    status, body, _ = request(keyed.url + "/readyz", headers={"Host": "rebound.example"})
    assert status == 421 and body["error"] == "bad_host"
    evil = {**AUTH, "Origin": "http://evil.example"}
    status, body, _ = request(keyed.url + "/v1/captions", image, evil)
    assert status == 403 and body["error"] == "cross_origin"
    same = {**AUTH, "Origin": keyed.url}
    assert request(keyed.url + "/v1/captions", image, same)[0] == 200


def test_demo_page_has_a_strict_csp(keyed):
    status, page, head = request(keyed.url + "/")
    csp = head["content-security-policy"]
    assert status == 200 and "default-src 'none'" in csp and "'unsafe-inline'" not in csp
    assert "script-src 'sha256-" in csp and head["x-frame-options"] == "DENY"


def test_slow_body_is_cut_off(keyed):
    """A client that declares a body and trickles it gets 408 after --timeout-s (2 s here)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=20) as sock:
        sock.sendall(f"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                     f"{KEY}\r\nContent-Length: 100000\r\n\r\n".encode() + b"x" * 100)
        reply = sock.recv(4096).decode(errors="replace")
    assert reply.split()[1] == "408", reply
    assert time.monotonic() - started < 10


def test_demo_page_with_a_key_in_a_browser(keyed):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("needs Debian's chromium for the headless browser check")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium,
                                             args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        blocked: list[str] = []
        page.on("console", lambda msg: blocked.append(msg.text) if "Content Security" in msg.text
                else None)
        page.goto(keyed.url + "/")
        page.wait_for_selector("#auth", state="visible", timeout=30000)  # the script ran
        page.fill("#query", "man")
        page.click("#search button")
        page.wait_for_selector("#summary:has-text('error')", timeout=30000)  # no key yet: 401
        page.fill("#key", KEY)
        page.click("#search button")
        page.wait_for_selector("#timeline li", timeout=30000)
        page.wait_for_function("[...document.querySelectorAll('#timeline img')]"
                               ".every(img => img.complete && img.naturalWidth > 0)", timeout=30000)
        browser.close()
    assert not blocked, blocked


# --- TLS -----------------------------------------------------------------------------------------

def test_tls(tiny_export, key_file, tmp_path, flickr_images):
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecap.cli", "serve", "--model", str(tiny_export), "--port",
         str(port), "--api-key-file", str(key_file), "--tls-cert", str(cert), "--tls-key",
         str(key)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    context = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}"
    try:
        wait_ready(url, context, proc)
        req = urllib.request.Request(url + "/v1/captions", data=flickr_images[0].read_bytes(),
                                     headers=AUTH, method="POST")
        with urllib.request.urlopen(req, timeout=60, context=context) as resp:
            assert resp.status == 200
        assert plain_http_status(port) != 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "Traceback" not in proc.stderr.read()


def plain_http_status(port: int) -> int | None:
    """The status plain HTTP gets from a TLS port (None: the connection was dropped)."""
    try:
        return request(f"http://127.0.0.1:{port}/healthz", timeout=5)[0]
    except OSError:
        return None


def wait_ready(url: str, context: ssl.SSLContext, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5, context=context) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    raise RuntimeError("TLS server did not become ready")
