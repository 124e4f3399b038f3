"""A bounded fuzz of `edgecap serve` from its own OpenAPI document (schemathesis + hypothesis).

One server on 127.0.0.1 with an archive and an API key. Every operation of the served document
gets a fixed number of generated requests, valid ones (positive) and invalid ones (negative),
with the key; none may get a 5xx, and the server's stderr must hold no traceback.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from test_serve_archive import archive_db  # noqa: F401 - the fixture, shared
from test_serve_security import AUTH, key_file, stop_and_read_stderr  # noqa: F401 - fixtures
from test_server import Server

EXAMPLES = 6  # generated requests per operation and mode: the whole test stays under 60 s
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


@pytest.fixture(scope="module")
def fuzzed(tiny_export, key_file, archive_db):  # noqa: F811 - fixtures
    # A short --timeout-s so a generated request that declares a body it never sends costs
    # little; the request-header timeout is left at its default.
    srv = Server(tiny_export, "--api-key-file", str(key_file), "--archive", str(archive_db),
                 "--timeout-s", "2", "--max-new-tokens", "8")
    yield srv
    stop_and_read_stderr(srv)  # asserts no traceback


def fuzz_operation(operation, mode: GenerationMode, base_url: str, seen: list[int]) -> None:
    """Send ``EXAMPLES`` generated requests for ``operation``; fail on any 5xx."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case) -> None:
        response = case.call(base_url=base_url, headers=AUTH, timeout=30)
        seen.append(response.status_code)
        # 504 is the designed answer to options (num_beams, max_new_tokens) whose caption does
        # not finish within --timeout-s; any other 5xx is a bug.
        timed_out = response.status_code == 504 and response.json()["error"] == "timeout"
        assert response.status_code < 500 or timed_out, (
            case.method, case.path, case.query, response.status_code, response.text[:300])

    one()


def test_fuzz_from_the_openapi_document(fuzzed):
    started = time.monotonic()
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/captions", "GET /v1/events", "GET /v1/snapshots/{id}"} <= labels
    statuses: list[int] = []
    for operation in operations:
        for mode in MODES:
            try:
                fuzz_operation(operation, mode, fuzzed.url, statuses)
            except Unsatisfiable:  # no parameter or body to make invalid (GET /healthz)
                assert mode is GenerationMode.NEGATIVE

    # Generated requests reached the handlers (not only the key check) and got their answers.
    assert len(statuses) >= len(operations) * EXAMPLES
    assert 200 in statuses and {400, 422} & set(statuses), sorted(set(statuses))
    # The key was sent with every request (negative cases may spoil the Authorization header).
    assert statuses.count(401) < len(statuses) / 4, statuses
    # A hang guard, not a speed target: the fuzz covers every documented route now, and a loaded
    # runner is slow.
    assert time.monotonic() - started < 300, statuses
