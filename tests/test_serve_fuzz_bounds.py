"""A property-based fuzz of every parameter of the served OpenAPI document with the values that
used to give 500s: overflowing integers, other scripts' digits, huge durations, dates at the
ends of the calendar with odd offsets. Every answer must be below 500, on a real server."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("starlette")
from test_serve_archive import archive_db  # noqa: E402,F401 - the fixture, shared
from test_server import Server, request  # noqa: E402

# Characters int() or float() or a regex's \d would take as digits, and look-alikes they reject.
ODD_DIGITS = "\u00b2\u00b3\u00b9\u2460\u2469\u0661\u0662\u0966\u096f\uff11\uff19\u1d7ce\U0001d7d8"


def _iso(year: int, month: int, day: int, minutes: int) -> str:
    sign = "-" if minutes < 0 else "+"
    return (f"{year:04d}-{month:02d}-{day:02d}T23:59:59{sign}"
            f"{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}")


NASTY = st.one_of(
    st.integers(min_value=2**31, max_value=2**300).map(str),
    st.integers(min_value=-(2**300), max_value=-1).map(str),
    st.text(alphabet=ODD_DIGITS, min_size=1, max_size=8),
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(0, 10**30), st.sampled_from("smhdw")),
    st.builds(_iso, st.sampled_from([1, 2, 1970, 9998, 9999]), st.integers(1, 12),
              st.integers(1, 28), st.integers(-(24 * 60 - 1), 24 * 60 - 1)),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "-1e999", "0x10", "1_000", " 7 ", "",
                     "\x00", "9" * 5000, "1." + "0" * 400, "00000000000000000000001"]),
)


@pytest.fixture(scope="module")
def fuzz_server(tiny_export, archive_db):  # noqa: F811 - the fixture
    srv = Server(tiny_export, "--archive", str(archive_db), "--timeout-s", "5",
                 "--max-new-tokens", "8")
    status, document, _ = request(srv.url + "/openapi.json")
    assert status == 200
    yield srv, document
    assert srv.stop() == 0  # asserts no traceback on stderr


def parameters(document: dict) -> list[tuple[str, str, str]]:
    """(method, path, parameter) for every parameter of the document."""
    found = [(method, path, parameter["name"])
             for path, operations in document["paths"].items()
             for method, operation in operations.items()
             for parameter in operation.get("parameters", [])]
    assert ("get", "/v1/events", "gap") in found  # the search's parameters are all documented
    return found


def test_nasty_values_never_get_a_5xx(fuzz_server):
    srv, document = fuzz_server
    targets = parameters(document)
    assert ("get", "/v1/snapshots/{id}", "id") in targets and len(targets) > 10
    seen: list[int] = []

    @settings(max_examples=200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(target=st.sampled_from(targets), value=NASTY)
    def one(target: tuple[str, str, str], value: str) -> None:
        method, path, name = target
        if "{" + name + "}" in path:
            url = srv.url + path.replace("{" + name + "}", urllib.parse.quote(value, safe=""))
        else:
            params = {name: value} if name == "q" else {"q": "man", name: value}
            url = f"{srv.url}{path}?{urllib.parse.urlencode(params)}"
        status, body, _ = request(url, b"not an image" if method == "post" else None,
                                  timeout=30)
        seen.append(status)
        assert status < 500, (method, path, name, value[:60], status, str(body)[:300])

    one()
    assert len(seen) == 200 and {400, 404} & set(seen), sorted(set(seen))
