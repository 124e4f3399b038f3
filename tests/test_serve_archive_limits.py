"""Archive hardening: query limits and budgets, reads beside a held write lock, bounded parsing
of ids and times (4xx, never 5xx), snapshots confined to their folder, owner-only file modes.
Live checks run `edgecap serve --archive` on 127.0.0.1."""

from __future__ import annotations

import os
import random
import stat
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from edgecap.archive import Archive, ArchiveError, parse_time
from edgecap.archive import QueryLimits, QueryRefused

pytest.importorskip("starlette")
from test_server import Server, request  # noqa: E402

WORDS = ("a man woman person dog cat car red blue green walking sitting standing door yard "
         "street truck bike ball tree house window light night day rain snow").split()
ROWS = 150_000  # the size of the red team's reproduction
THOUSAND_TERMS = " OR ".join(["a*"] * 1000)


def fill(archive: Archive, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for start in range(0, rows, 5000):
        archive.add_many([{"camera": f"cam{i % 4}", "stream_time": float(i), "frame_index": i,
                           "wall_time": f"2026-11-{1 + i * 28 // rows:02d}T12:00:00Z",
                           "generated_text": " ".join(
                               rng.choice(WORDS) + rng.choice(("", "s", "er")) for _ in range(10))}
                          for i in range(start, min(start + 5000, rows))])


@pytest.fixture(scope="module")
def big_archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big-archive") / "captions.db"
    with Archive.open(path) as archive:
        fill(archive, ROWS)
    return path


def test_query_text_limits():
    limits = QueryLimits(max_chars=60, max_terms=4, max_prefix_terms=1)
    limits.check_text('"red car" OR dog NOT cat')  # operators are no terms
    for query, reason in [("x" * 61, "61 characters"), ("a b c d e", "5 terms"),
                          ("walk* run*", "2 prefix terms"), ('"a b c d e"', "5 terms")]:
        with pytest.raises(QueryRefused, match=reason) as caught:
            limits.check_text(query)
        assert not caught.value.busy


def test_time_budget_stops_a_costly_query(big_archive):
    unlimited_text = dict(max_chars=10**6, max_terms=10**6, max_prefix_terms=10**6)
    with Archive.open(big_archive, readonly=True) as archive:
        started = time.monotonic()
        with pytest.raises(QueryRefused, match="longer than") as caught:
            archive.search(THOUSAND_TERMS, limits=QueryLimits(**unlimited_text, max_seconds=0.5))
        assert caught.value.busy and time.monotonic() - started < 5
        with pytest.raises(QueryRefused, match="too much work") as caught:
            archive.search(THOUSAND_TERMS, limits=QueryLimits(**unlimited_text, max_steps=1000))
        assert not caught.value.busy
        assert len(archive.search("person", limits=QueryLimits())) == 50  # within budget


def test_reads_do_not_wait_for_a_held_write(tmp_path):
    with Archive.open(tmp_path / "a.db") as archive:
        fill(archive, 100)
        held, release = threading.Event(), threading.Event()

        def long_write():
            with archive._write():  # BEGIN IMMEDIATE, and the archive's writer lock
                held.set()
                release.wait(10)

        writer = threading.Thread(target=long_write)
        writer.start()
        try:
            assert held.wait(10)
            started = time.monotonic()
            assert archive.search("dog") and archive.count() == 100 and archive.get([1])
            assert time.monotonic() - started < 2  # generous: a wait would be the full 10 s
        finally:
            release.set()
            writer.join()


@pytest.mark.parametrize("text", ["99999999999w", "9999-12-31T23:59:59-23:59",
                                  "0001-01-01T00:00:00+23:59", "\u00b2h", "\u0661\u0662h",
                                  "1e999s", "nan"])
def test_overflowing_times_are_archive_errors(text):
    with pytest.raises(ArchiveError, match="time"):
        parse_time(text)


@pytest.fixture(scope="module")
def big_server(tiny_export, big_archive):
    srv = Server(tiny_export, "--archive", str(big_archive))
    yield srv
    assert srv.stop() == 0


def timed_events(server: Server, **params) -> tuple[int, dict, float]:
    started = time.monotonic()
    status, body, _ = request(f"{server.url}/v1/events?{urllib.parse.urlencode(params)}")
    return status, body, time.monotonic() - started


def test_thousand_terms_beside_a_plain_search(big_server):
    with ThreadPoolExecutor(5) as pool:
        costly = [pool.submit(timed_events, big_server, q=THOUSAND_TERMS) for _ in range(4)]
        time.sleep(0.05)
        plain = pool.submit(timed_events, big_server, q="person")
        status, body, seconds = plain.result()
        assert status == 200 and body["events"] and seconds < 2, (status, seconds)
        for future in costly:
            status, body, seconds = future.result()
            assert status in (400, 503) and seconds < 5, (status, body, seconds)
            assert body["error"] in ("query_too_costly", "search_busy") and body["detail"]


OVERFLOWS = ["9223372036854775808", "99999999999999999999999", "\u00b2", "\u2460", "-1", "0",
             "\u0661\u0662", "1e3", " 1", "1" * 5000]


def test_overflowing_inputs_get_4xx(big_server):
    for bad in OVERFLOWS:
        status, _, _ = request(f"{big_server.url}/v1/snapshots/{urllib.parse.quote(bad)}")
        assert status == 404, bad
    searches = [{"since": "99999999999w"}, {"until": "9999-12-31T23:59:59-23:59"},
                {"since": "\u00b2h"}, {"gap": "1e999"}, {"gap": "nan"}, {"gap": "-1"}]
    searches += [{"limit": bad} for bad in OVERFLOWS]
    for params in searches:
        status, body, _ = timed_events(big_server, q="person", **params)
        assert status == 400 and body["error"] == "bad_query", (params, body)
    for option in ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty"):
        for bad in OVERFLOWS + ["1e999", "inf", "nan"]:
            query = urllib.parse.urlencode({option: bad})
            status, body, _ = request(f"{big_server.url}/v1/captions?{query}", b"x")
            assert 400 <= status < 500, (option, bad, status, body)


@pytest.fixture(scope="module")
def confined(tiny_export, tmp_path_factory):
    """An archive whose rows point inside, outside and through a symlink out of its folder."""
    root = tmp_path_factory.mktemp("confined")
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.jpg"
    Image.new("RGB", (8, 8), "blue").save(outside)
    snapshots = root / "snapshots"
    snapshots.mkdir()
    inside = snapshots / "inside.jpg"
    Image.new("RGB", (8, 8), "red").save(inside)
    (snapshots / "link.jpg").symlink_to(outside)
    (root / "linked-folder").symlink_to(outside.parent, target_is_directory=True)
    rows = {"inside": inside, "outside": outside, "link": snapshots / "link.jpg",
            "via_folder": root / "linked-folder" / "secret.jpg",
            "dotdot": snapshots / ".." / ".." / outside.parent.name / "secret.jpg"}
    ids = {}
    with Archive.open(root / "captions.db") as archive:
        for i, (name, path) in enumerate(rows.items()):
            ids[name] = archive.add({"camera": "door", "stream_time": float(i), "frame_index": i,
                                     "wall_time": "2026-11-25T12:00:00Z",
                                     "generated_text": f"a {name} snapshot", "snapshot": str(path)})
    srv = Server(tiny_export, "--archive", str(root / "captions.db"), "--snapshots", str(snapshots))
    yield srv, ids, inside.read_bytes()
    assert srv.stop() == 0


def test_snapshots_only_from_inside_their_folder(confined):
    srv, ids, inside = confined
    status, body, headers = request(f"{srv.url}/v1/snapshots/{ids['inside']}")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    for name in ("outside", "link", "via_folder", "dotdot"):
        status, body, _ = request(f"{srv.url}/v1/snapshots/{ids[name]}")
        assert status == 404 and body["error"] == "not_found", name


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_archive_and_snapshots_are_owner_only(tmp_path):
    from edgecap.archive.writer import ArchiveWriter
    from edgecap.results import CaptionResult
    from edgecap.watch.stream import CaptionRecord

    old = os.umask(0o022)  # the usual default, which used to leave everything world-readable
    try:
        writer = ArchiveWriter(tmp_path / "captions.db", "door", tmp_path / "snapshots")
        record = CaptionRecord(CaptionResult("a door", [1], -0.5), stream_time=1.0,
                               wall_time="2026-11-25T12:00:00+00:00", frame_index=1,
                               latency_ms=1.0, dropped=0, reason="first", camera="door")
        record.image = Image.new("RGB", (32, 32), "red")
        writer.add(record)
        writer.close()
    finally:
        os.umask(old)
    files = [tmp_path / "captions.db", *(tmp_path / "snapshots").iterdir()]
    files += [p for p in tmp_path.glob("captions.db-*")]  # WAL and shared memory, if left
    modes = {p.name: oct(mode(p)) for p in files}
    assert len(files) >= 2 and set(modes.values()) == {"0o600"}, modes
    assert mode(tmp_path / "snapshots") == 0o700
