"""Bounded load test of `edgecap serve` on 127.0.0.1 (not a test; loopback only).

Starts the server, then: (1) images/s at concurrency 1 and 8 (does batching pay?), (2) about
3x capacity: every request must be answered 200 or 503, with p99 of the served ones. Fixed
request counts, so it always ends.

    python -m benchmarks.serve_load [--model DIR] [--requests 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .local_server import running_server

import numpy as np

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


def post(url: str, data: bytes) -> tuple[int, float]:
    began = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=120) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, (time.perf_counter() - began) * 1e3


def run_load(url: str, payloads: list[bytes], concurrency: int) -> dict:
    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: post(url, p), payloads))
    wall = time.perf_counter() - began
    served = [ms for status, ms in results if status == 200]
    return {"concurrency": concurrency, "requests": len(results),
            "ok": len(served), "shed_503": sum(s == 503 for s, _ in results),
            "other": sum(s not in (200, 503) for s, _ in results),
            "images_per_s": len(served) / wall,
            "p50_ms": float(np.percentile(served, 50)) if served else None,
            "p99_ms": float(np.percentile(served, 99)) if served else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args(argv)
    with running_server(args.model, "--max-queue", "16") as base:
        names = [n for n in (FLICKR / "split_test.txt").read_text().split() if n]
        payloads = [(FLICKR / "images" / n).read_bytes() for n in names[: args.requests]]
        url = base + "/v1/captions?beams=1"
        report = {"sequential": run_load(url, payloads, 1), "concurrent": run_load(url, payloads, 8)}
        report["batching_gain"] = report["concurrent"]["images_per_s"] / report["sequential"]["images_per_s"]
        report["overload_3x"] = run_load(url, payloads * 3, 48)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
