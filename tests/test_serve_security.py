"""`edgecap serve` hardening: API keys, Host/Origin checks, headers, slow bodies, TLS, unsafe binds,
rate limits, slow headers (slowloris), CORS, metrics behind the key, no key in the logs.

Live checks run a real server on 127.0.0.1 and talk to it with urllib and raw sockets.
"""

from __future__ import annotations

import http.client
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from edgecap.cli.main import _serve_settings, build_parser, main
from edgecap.serve.limits import RateLimiter, retry_after
from edgecap.serve.security import (
    Guard,
    Policy,
    SecurityConfigError,
    UnsafeBind,
    bind_policy,
    load_api_keys,
)
from test_serve_archive import archive_db  # noqa: F401 - the fixture, shared
from browser import headless_page, wait_for_images  # noqa: E402
from test_server import Server, free_port, request

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
    stderr = stop_and_read_stderr(srv)
    # Right and wrong keys were sent many times: neither may reach the server's log.
    assert KEY not in stderr and "x" * 32 not in stderr and "b" * 32 not in stderr, stderr


HEADER_TIMEOUT_S = 2.0
CORS_ORIGIN = "http://dash.example:9000"


@pytest.fixture(scope="module")
def limited(tiny_export, key_file):
    """A keyed server with a small rate limit (1/s, burst 3), short header and keep-alive
    timeouts, /metrics behind the key and one CORS origin."""
    srv = Server(tiny_export, "--api-key-file", str(key_file), "--rate-limit", "1",
                 "--rate-burst", "3", "--header-timeout-s", str(HEADER_TIMEOUT_S),
                 "--keep-alive-s", "1", "--metrics-auth", "--cors-origin", CORS_ORIGIN)
    yield srv
    assert srv.stop() == 0


def stop_and_read_stderr(srv: Server) -> str:
    """SIGTERM ``srv``; its whole stderr (no traceback allowed)."""
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    stderr = srv.proc.stderr.read()
    assert "Traceback" not in stderr, stderr
    return stderr


def call(port: int, source: str, method: str = "GET", path: str = "/healthz",
         headers: dict | None = None, body: bytes | None = None) -> http.client.HTTPResponse:
    """One request to 127.0.0.1:``port`` sent from the loopback address ``source``; the
    response, read (Linux routes all of 127.0.0.0/8 to loopback, so each is its own client)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


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


def test_insecure_no_auth_warns_and_no_auth_is_its_alias(capsys):
    for flag in ("--insecure-no-auth", "--no-auth"):
        args = build_parser().parse_args(["serve", "--host", "0.0.0.0", flag])
        settings = _serve_settings(args)
        assert settings is not None and settings.api_keys == ()
        err = capsys.readouterr().err
        assert "warning: --insecure-no-auth: anyone who can reach 0.0.0.0:8000" in err
        assert settings.rate_limit > 0  # a network bind is rate limited by default
    assert "--no-auth" not in build_parser().format_help()
    args = build_parser().parse_args(["serve"])
    assert _serve_settings(args).rate_limit == 0.0  # loopback: local tools are not throttled
    assert capsys.readouterr().err == ""


def test_bad_cors_origin_is_a_usage_error(capsys):
    for origin in ("*", "dash.example", "https://dash.example/path"):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", "--cors-origin", origin])
        assert exit_.value.code == 2
        assert "--cors-origin" in capsys.readouterr().err


def test_rate_limiter_buckets():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, max_clients=100, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert limiter.take("a") == pytest.approx(0.5)  # the next token in 1/rate s
    assert limiter.take("b") == 0.0  # another client has its own bucket
    now[0] += 0.5
    assert limiter.take("a") == 0.0 and limiter.take("a") > 0
    assert retry_after(0.01) == "1" and retry_after(1.2) == "2"
    for i in range(1000):  # a flood of addresses: the table stays bounded
        limiter.take(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100


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
    with headless_page() as page:
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
        wait_for_images(page, "#timeline img")
    assert not blocked, blocked


# --- limits: rate, slow headers; CORS; metrics behind the key ----------------------------------

def test_a_burst_gets_429_while_another_client_is_served(limited, flickr_images):
    statuses, retry = [], None
    for _ in range(6):  # burst 3 at 1/s: the first 3 pass, then 429
        response = call(limited.port, "127.0.0.2", path="/openapi.json")
        statuses.append(response.status)
        retry = response.getheader("retry-after") or retry
    assert statuses[:3] == [200] * 3 and statuses[-2:] == [429] * 2, statuses
    assert retry is not None and int(retry) >= 1
    assert call(limited.port, "127.0.0.2", path="/healthz").status == 200  # probes: never limited
    other = call(limited.port, "127.0.0.3", "POST", "/v1/captions", AUTH,
                 flickr_images[0].read_bytes())
    assert other.status == 200  # another client is still served
    # A wrong key spends tokens too, so guessing keys is throttled.
    guesses = [call(limited.port, "127.0.0.4", "POST", "/v1/captions",
                    {"Authorization": "Bearer " + "g" * 32}, b"x").status for _ in range(5)]
    assert guesses[:3] == [401] * 3 and guesses[-1] == 429, guesses


def test_metrics_need_the_key_with_metrics_auth(limited, keyed):
    assert call(limited.port, "127.0.0.5", path="/metrics").status == 401
    assert call(limited.port, "127.0.0.5", path="/metrics", headers=AUTH).status == 200
    spec = request(limited.url + "/openapi.json")[1]
    assert spec["paths"]["/metrics"]["get"]["security"] == [{"apiKey": []}]
    assert request(keyed.url + "/metrics")[0] == 200  # open without --metrics-auth


def test_cors_only_for_the_given_origin(limited, keyed):
    preflight = {"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    response = call(limited.port, "127.0.0.6", "OPTIONS", "/v1/captions", preflight)
    assert response.status == 200  # a preflight carries no key
    assert response.getheader("access-control-allow-origin") == CORS_ORIGIN
    response = call(limited.port, "127.0.0.6", "GET", "/v1/captions", {"Origin": CORS_ORIGIN})
    assert response.status == 401  # the origin passes the Origin check; the key is still needed
    assert response.getheader("access-control-allow-origin") == CORS_ORIGIN
    evil = call(limited.port, "127.0.0.6", headers={"Origin": "http://evil.example"})
    assert evil.status == 403 and evil.getheader("access-control-allow-origin") is None
    # Without --cors-origin: no CORS headers at all, and another origin is refused.
    status, _, head = request(keyed.url + "/healthz", headers={"Origin": CORS_ORIGIN})
    assert status == 403 and "access-control-allow-origin" not in {k.lower() for k in head}


def trickle_headers(port: int, source: str, limit_s: float) -> float:
    """Send a request's headers one byte a second; seconds until the server closed the
    connection (``limit_s`` if it never did)."""
    data = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 100
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), source_address=(source, 0)) as sock:
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # reset: closed
                return time.monotonic() - started
            readable, _, _ = select.select([sock], [], [], 1.0)
            try:
                closed = readable and not sock.recv(4096)  # EOF: the server closed it
            except OSError:  # or reset it: closed as well
                closed = True
            if closed:
                return time.monotonic() - started
            if time.monotonic() - started > limit_s:
                break
    return limit_s


def test_slowloris_is_dropped_while_others_are_served(limited, flickr_images):
    image = flickr_images[0].read_bytes()
    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(trickle_headers, limited.port, f"127.0.1.{i}", 15.0) for i in range(3)]
        time.sleep(0.5)
        normal = call(limited.port, "127.0.0.7", "POST", "/v1/captions", AUTH, image)
        assert normal.status == 200  # served while the slow clients hold their sockets
        closed_after = [future.result() for future in slow]
    for seconds in closed_after:
        assert HEADER_TIMEOUT_S - 0.5 < seconds < HEADER_TIMEOUT_S + 2.0, closed_after


def test_idle_connections_are_closed(limited):
    """A connection that sends nothing, and one idle after its answer (keep-alive 1 s)."""
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 2.0
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10,
                                  source_address=("127.0.0.8", 0)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = b""
        while not reply.endswith(b'"live"}'):  # the whole answer (head and body may split)
            reply += sock.recv(4096)
        assert b" 200 " in reply
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert time.monotonic() - started < 1.0 + 1.5


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
