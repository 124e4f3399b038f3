"""`edgecap serve` as a real server on 127.0.0.1, driven by a real HTTP client (urllib)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from edgecap import Captioner  # noqa: E402

from test_robust_inputs import build_corpus  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, model: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgecap.cli", "serve", "--model", str(model),
             "--port", str(self.port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if request(self.url + "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read())
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def stop(self) -> int:
        """SIGTERM, then 0 for a clean exit. uvicorn re-raises the signal once it has shut down
        gracefully (exit status -15); a traceback on stderr means it did not."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        stderr = self.proc.stderr.read()
        assert "Traceback" not in stderr, stderr
        return 0 if code in (0, -signal.SIGTERM) else code


def request(url: str, data: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, dict | str, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {},
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body, head = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, body, head = exc.code, exc.read(), dict(exc.headers)
    try:
        return status, json.loads(body), head
    except ValueError:
        return status, body.decode(errors="replace"), head


def oversized_status(port: int, declared: int) -> int:
    """Declare a body over the limit and send only its start: the server must answer 413 from
    the declared length at once. (Streaming the whole body races the server closing the
    connection after its early answer, which a client sees as a broken pipe.)"""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Length: {declared}\r\n\r\n".encode() + b"x" * 1024)
        reply = sock.recv(4096).decode(errors="replace")
    return int(reply.split()[1])


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def server(tiny_export):
    srv = Server(tiny_export, "--max-body-mb", "2")
    yield srv
    assert srv.stop() == 0


def test_captions_equal_api(server, tiny_export, flickr_images):
    api = Captioner(tiny_export).caption(flickr_images[:3], num_beams=2)
    for image, expected in zip(flickr_images, api):
        status, body, _ = request(server.url + "/v1/captions?beams=2", image.read_bytes())
        assert status == 200, body
        assert body["generated_text"] == expected.text and body["token_ids"] == expected.token_ids
    data, headers = multipart([(p.name, p.read_bytes()) for p in flickr_images[:3]], {"beams": "2"})
    status, body, _ = request(server.url + "/v1/captions", data, headers)
    assert status == 200, body
    assert [r["token_ids"] for r in body["results"]] == [r.token_ids for r in api]


def test_exact_preprocessing_is_a_request_field(server, tiny_export, flickr_images):
    """A 1080p JPEG is decoded at a reduced scale unless the request asks for exact pixels;
    either way the record equals the Python API's with the same setting (the score tells the
    two decodes apart where the tiny model's tokens do not)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.open(flickr_images[0]).convert("RGB").resize((1920, 1080)).save(buffer, "JPEG")
    data = buffer.getvalue()
    expected = {exact: Captioner(tiny_export, exact_preprocessing=exact).caption(data).to_record()
                for exact in (False, True)}
    assert expected[False]["score"] != expected[True]["score"]
    for query, exact in (("", False), ("?exact_preprocessing=true", True),
                         ("?exact_preprocessing=false", False)):
        status, body, _ = request(server.url + "/v1/captions" + query, data)
        assert status == 200, body
        assert (body["token_ids"], body["score"]) == \
            (expected[exact]["token_ids"], expected[exact]["score"]), query
    form, headers = multipart([("big.jpg", data)], {"exact_preprocessing": "true"})
    status, body, _ = request(server.url + "/v1/captions", form, headers)
    assert status == 200 and body["score"] == expected[True]["score"]  # one image: one record
    status, body, _ = request(server.url + "/v1/captions?exact_preprocessing=maybe", data)
    assert status == 400 and "exact_preprocessing" in body["detail"]


def test_bad_inputs_get_4xx_with_reasons(server, flickr_images, tmp_path):
    expect = build_corpus(tmp_path, flickr_images[0])
    checked = 0
    for name, outcome in sorted(expect.items()):
        path = tmp_path / name
        if not path.is_file() or outcome == "any":
            continue
        status, body, _ = request(server.url + "/v1/captions", path.read_bytes())
        if outcome == "ok":
            assert status == 200, (name, body)
        else:
            assert 400 <= status < 500, (name, status, body)
            assert body["detail"], name
        checked += 1
    assert checked >= 70
    assert oversized_status(server.port, 3 * 2**20) == 413
    status, body, _ = request(server.url + "/v1/captions?beams=0", flickr_images[0].read_bytes())
    assert status == 400 and "num_beams" in body["detail"]
    status, body, _ = request(server.url + "/v1/captions?beams=two", flickr_images[0].read_bytes())
    assert status == 400


def test_health_metrics_openapi_and_demo(server):
    from prometheus_client.parser import text_string_to_metric_families

    assert request(server.url + "/healthz")[0] == 200
    assert request(server.url + "/readyz")[1]["status"] == "ready"
    status, text, _ = request(server.url + "/metrics")
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"edgecap_requests", "edgecap_errors", "edgecap_queue_depth", "edgecap_batch_size",
            "edgecap_request_duration_seconds"} <= families
    status, spec, _ = request(server.url + "/openapi.json")
    assert status == 200 and "/v1/captions" in spec["paths"]
    status, page, _ = request(server.url + "/")
    assert status == 200 and "/v1/captions" in page


def test_overload_sheds_with_503_and_loses_nothing(tiny_export, flickr_images):
    srv = Server(tiny_export, "--max-queue", "2", "--max-batch", "2", "--max-wait-ms", "5")
    payload = flickr_images[0].read_bytes()
    url = srv.url + "/v1/captions?beams=4&max_new_tokens=40"
    try:
        with ThreadPoolExecutor(24) as pool:
            statuses = [r[0] for r in pool.map(lambda _: request(url, payload), range(120))]
        _, text, _ = request(srv.url + "/metrics")
    finally:
        assert srv.stop() == 0
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    served = [line for line in text.splitlines() if line.startswith('edgecap_requests_total{status="200"}')]
    assert float(served[0].split()[-1]) == statuses.count(200)  # every accepted request answered


def test_sigterm_during_load_finishes_accepted_requests(tiny_export, flickr_images):
    srv = Server(tiny_export, "--max-queue", "16", "--max-batch", "4")
    payload = flickr_images[1].read_bytes()
    url = srv.url + "/v1/captions?beams=4&max_new_tokens=40"

    def call(_):
        try:
            return request(url, payload)[0]
        except OSError:
            return "refused"  # sent after the server stopped accepting: never accepted

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(call, i) for i in range(48)]
        time.sleep(0.3)
        code = srv.stop()
        results = [f.result() for f in futures]
    assert code == 0
    assert set(results) <= {200, 503, "refused"}, results
    assert results.count(200) > 0
