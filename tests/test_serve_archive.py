"""`edgecap serve --archive`: search and snapshots over real HTTP on 127.0.0.1, the demo page's
search box in headless Chromium (when Debian's chromium and playwright are installed)."""

from __future__ import annotations

import datetime
import shutil
import urllib.parse
from pathlib import Path

import pytest

pytest.importorskip("starlette")

from edgecap.archive.store import Archive  # noqa: E402

from browser import headless_page, wait_for_images  # noqa: E402
from test_server import Server, request  # noqa: E402

PHOTOS = Path(__file__).resolve().parent / "data"
NOW = datetime.datetime.now(datetime.timezone.utc)
ROWS = [  # (camera, seconds ago, caption, photo)
    ("door", 300, "a man in a red jacket stands at the door", "astronaut"),
    ("door", 290, "a man in a red jacket opens the door", "astronaut"),
    ("door", 100, "a cat sits on the doormat", "cat"),
    ("yard", 200, "a rocket stands in the yard", "rocket"),
    ("yard", 7200, "a man waters the garden", "camera"),
]


@pytest.fixture(scope="module")
def archive_db(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("served-archive")
    db = folder / "events.db"
    with Archive.open(db) as archive:
        for i, (camera, ago, caption, photo) in enumerate(ROWS):
            snapshot = folder / f"{camera}-{i}.jpg"
            shutil.copy(PHOTOS / f"{photo}.jpg", snapshot)
            archive.add({"camera": camera, "stream_time": float(i), "frame_index": i,
                         "wall_time": (NOW - datetime.timedelta(seconds=ago)).isoformat(),
                         "generated_text": caption, "score": -0.5, "latency_ms": 20.0,
                         "snapshot": str(snapshot)})
    return db


@pytest.fixture(scope="module")
def archive_server(tiny_export, archive_db):
    srv = Server(tiny_export, "--archive", str(archive_db))
    yield srv
    assert srv.stop() == 0


def events(server: Server, **params) -> tuple[int, dict]:
    status, body, _ = request(f"{server.url}/v1/events?{urllib.parse.urlencode(params)}")
    return status, body


def test_events_merge_hits_and_point_at_snapshots(archive_server):
    status, body = events(archive_server, q="man")
    assert status == 200
    # The two door captions ten seconds apart are one event; the yard's is another.
    assert sorted((e["camera"], len(e["ids"])) for e in body["events"]) == [("door", 2), ("yard", 1)]
    door = next(e for e in body["events"] if e["camera"] == "door")
    assert "red jacket" in door["caption"] and door["snapshot_url"].startswith("/v1/snapshots/")
    assert all("snapshot" not in e for e in body["events"])  # URLs, never file-system paths
    status, body = events(archive_server, q='"red jacket" OR rocket', frames="true")
    assert status == 200 and len(body["hits"]) == 3


def test_filters_by_camera_and_time(archive_server):
    assert [e["camera"] for e in events(archive_server, q="man", camera="yard")[1]["events"]] == ["yard"]
    recent = events(archive_server, q="man", since="1h", frames="true")[1]["hits"]
    assert {h["camera"] for h in recent} == {"door"}
    older = events(archive_server, q="man", until=(NOW - datetime.timedelta(hours=1)).isoformat(),
                   frames="true")[1]["hits"]
    assert [h["caption"] for h in older] == ["a man waters the garden"]


def test_snapshots_by_id_only(archive_server):
    hit = events(archive_server, q="cat", frames="true")[1]["hits"][0]
    status, body, headers = request(archive_server.url + hit["snapshot_url"])
    assert status == 200 and headers["content-type"] == "image/jpeg"
    for path in ["/v1/snapshots/999", "/v1/snapshots/..%2F..%2Fetc%2Fpasswd",
                 "/v1/snapshots/%2Fetc%2Fpasswd", "/v1/snapshots/-1", "/v1/snapshots/1.0"]:
        assert request(archive_server.url + path)[0] == 404, path


@pytest.mark.parametrize("params,detail", [
    ({"q": '"unclosed'}, "query"), ({"q": "man NOT"}, "query"), ({"q": ""}, "q:"),
    ({"q": "man", "since": "yesterday-ish"}, "since"), ({"q": "man", "limit": "0"}, "limit"),
])
def test_bad_queries_are_400_with_a_reason(archive_server, params, detail):
    status, body = events(archive_server, **params)
    assert status == 400 and body["error"] == "bad_query", body
    assert detail in body["detail"].lower(), body


def test_openapi_lists_the_archive_endpoints(archive_server):
    paths = request(archive_server.url + "/openapi.json")[1]["paths"]
    assert {"/v1/events", "/v1/snapshots/{id}", "/v1/captions"} <= set(paths)


def test_demo_page_searches_the_archive(archive_server, tmp_path):
    with headless_page(viewport={"width": 900, "height": 900}) as page:
        page.goto(archive_server.url + "/")
        page.wait_for_selector("#archive", state="visible", timeout=30000)
        page.fill("#query", "man")
        page.click("#search button")
        page.wait_for_selector("#timeline li", timeout=30000)
        rows = page.locator("#timeline li")
        assert rows.count() == 2
        assert "red jacket" in rows.nth(0).inner_text()  # newest event first
        wait_for_images(page, "#timeline img")
        page.screenshot(path=str(tmp_path / "archive-search.png"), full_page=True)
