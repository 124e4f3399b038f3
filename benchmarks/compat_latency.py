"""Latency per description through the OpenAI- and Ollama-compatible endpoints against
``/v1/captions``, for one image and for several, in the same run (loopback; not a test).

One server, one keep-alive connection per API. Each round sends one request to every API, in
an order that rotates from round to round, so a noisy neighbour costs every API alike. The
payloads are built before timing (a client encodes its images once either way), so the numbers
are the round trip: the body read, JSON and base64 decoding, captioning, and the answer.

    python -m benchmarks.compat_latency [--model DIR] [--rounds 40] [--images 1 4]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from .local_server import running_server

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "data"
PHOTO_NAMES = ("cat", "coffee", "astronaut", "rocket", "hubble", "retina", "camera", "clock")
PROMPT = "Describe the object in these frames in one sentence."

Request = tuple[str, bytes, dict[str, str]]  # path, body, headers


def captions_request(images: list[bytes]) -> Request:
    """edgecap's own API: the raw body for one image, multipart for several."""
    if len(images) == 1:
        return "/v1/captions", images[0], {"Content-Type": "image/jpeg"}
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
             f'filename="{i}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode() + data + b"\r\n"
             for i, data in enumerate(images)]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return "/v1/captions", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def openai_request(images: list[bytes]) -> Request:
    """Frigate's OpenAI shape: image parts with detail low, then the prompt as a bare string."""
    content: list = [{"type": "image_url", "image_url": {
        "url": "data:image/jpeg;base64," + base64.b64encode(im).decode(), "detail": "low"}}
        for im in images]
    body = {"model": "edgecap", "messages": [{"role": "user", "content": [*content, PROMPT]}]}
    return "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}


def ollama_request(images: list[bytes]) -> Request:
    """Frigate's Ollama shape: generate with base64 images, not streamed."""
    body = {"model": "edgecap", "prompt": PROMPT, "stream": False,
            "images": [base64.b64encode(im).decode() for im in images]}
    return "/api/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}


APIS: dict[str, Callable[[list[bytes]], Request]] = {
    "/v1/captions": captions_request, "openai chat": openai_request, "ollama generate": ollama_request}


def timed(connection: http.client.HTTPConnection, request: Request) -> float:
    """Milliseconds for one request on a kept-alive connection; raises on a non-200 answer.

    A connection the server closed while idle (its keep-alive timeout) is reopened and the
    request timed again from the start."""
    path, body, headers = request
    for attempt in range(2):
        began = time.perf_counter()
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            break
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            connection.close()  # http.client connects again on the next request
            if attempt:
                raise
    elapsed = (time.perf_counter() - began) * 1e3
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {payload[:200]!r}")
    return elapsed


def measure(base: str, count: int, rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    """p50/p95 per API for requests of ``count`` images, interleaved round by round."""
    images = [(PHOTOS / f"{name}.jpg").read_bytes() for name in PHOTO_NAMES[:count]]
    requests = {name: build(images) for name, build in APIS.items()}
    host = urlsplit(base)
    connections = {name: http.client.HTTPConnection(host.hostname, host.port, timeout=120)
                   for name in APIS}
    samples: dict[str, list[float]] = {name: [] for name in APIS}
    names = list(APIS)
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            ms = timed(connections[name], requests[name])
            if round_index >= warmup:
                samples[name].append(ms)
    for connection in connections.values():
        connection.close()
    baseline = float(np.percentile(samples["/v1/captions"], 50))
    return {name: {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                   "p50_vs_captions": float(np.percentile(ms, 50)) / baseline}
            for name, ms in samples.items()}


def parse_cost_ms(count: int, repeats: int = 50) -> dict[str, float]:
    """Median milliseconds the compatible routes add in-process per request: JSON parsing, the
    message walk and base64 decoding (the image decode and captioning are shared with
    ``/v1/captions``). Less sensitive to a busy machine than the round trips."""
    from edgecap.serve.compat_ollama import _generate_images
    from edgecap.serve.compat_openai import _images

    images = [(PHOTOS / f"{name}.jpg").read_bytes() for name in PHOTO_NAMES[:count]]
    bodies = {"openai chat": (openai_request(images)[1], lambda b: _images(b["messages"])),
              "ollama generate": (ollama_request(images)[1], _generate_images)}
    costs = {}
    for name, (body, extract) in bodies.items():
        samples = []
        for _ in range(repeats):
            began = time.perf_counter()
            extract(json.loads(body))
            samples.append((time.perf_counter() - began) * 1e3)
        costs[name] = float(np.median(samples))
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="export directory (default: the embedded model)")
    parser.add_argument("--rounds", type=int, default=40, help="timed requests per API and size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4],
                        help="images per request, one measurement each")
    parser.add_argument("--threads", type=int, help="the server's --threads")
    args = parser.parse_args(argv)
    extra = ["--threads", str(args.threads)] if args.threads else []
    report = {}
    with running_server(args.model, *extra) as base:
        for count in args.images:
            report[f"{count} image(s)"] = measure(base, count, args.rounds, args.warmup)
            for name, ms in parse_cost_ms(count).items():
                report[f"{count} image(s)"][name]["parse_ms"] = ms
    print(json.dumps(report, indent=2))
    for size, apis in report.items():
        for name, row in apis.items():
            parse = f"  parse {row['parse_ms']:.2f} ms" if "parse_ms" in row else ""
            print(f"{size:>10}  {name:<16} p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms"
                  f"  p50 x{row['p50_vs_captions']:.3f}{parse}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
