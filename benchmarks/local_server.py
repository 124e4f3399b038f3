"""Start `edgecap serve` on a free loopback port for a benchmark script, and stop it after."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator


@contextlib.contextmanager
def running_server(model: str | None, *extra: str, ready_timeout_s: float = 60.0) -> Iterator[str]:
    """Yield the server's base URL once /readyz answers; SIGTERM it on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "edgecap.cli", "serve", "--port", str(port), *extra]
    if model:
        command += ["--model", model]
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                urllib.request.urlopen(base + "/readyz", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("edgecap serve did not become ready") from None
                time.sleep(0.1)
        yield base
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
