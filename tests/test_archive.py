"""The caption archive (edgecap.archive) and `edgecap search`: real SQLite files, real processes."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edgecap.archive import Archive, ArchiveError, Hit, events, parse_time
from edgecap.cli.main import main
from edgecap.errors import EdgecapError

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)


def record(text: str, minutes_ago: float, camera: str = "front", **extra) -> dict:
    wall = NOW - dt.timedelta(minutes=minutes_ago)
    return {"camera": camera, "stream_time": 1000 - minutes_ago * 60, "frame_index": 7,
            "wall_time": wall.isoformat(timespec="milliseconds"), "generated_text": text,
            "score": -0.4, "latency_ms": 95.0, "reason": "scene", **extra}


CAPTIONS = [
    ("a man standing at the door", 300, "front"),
    ("a red car parked in the driveway", 200, "front"),
    ("a dog running on the grass", 120, "back"),
    ("a man walking a dog on the street", 60, "street"),
    ("a woman carrying a red bag at the door", 30, "front"),
    ("two cats sitting on a fence", 10, "back"),
]


@pytest.fixture
def archive_path(tmp_path) -> Path:
    path = tmp_path / "events.db"
    with Archive.open(path) as archive:
        ids = archive.add_many(record(text, ago, cam) for text, ago, cam in CAPTIONS)
    assert ids == list(range(1, len(CAPTIONS) + 1))
    return path


def captions(hits: list[Hit]) -> list[str]:
    return [hit.caption for hit in hits]


def test_query_syntax_words_phrase_or_not_prefix_stemming(archive_path):
    with Archive.open(archive_path, readonly=True) as archive:
        assert set(captions(archive.search("man door"))) == {"a man standing at the door"}
        assert captions(archive.search('"red car"')) == ["a red car parked in the driveway"]
        assert set(captions(archive.search("car OR cats"))) == {
            "a red car parked in the driveway", "two cats sitting on a fence"}
        assert set(captions(archive.search("man NOT dog"))) == {"a man standing at the door"}
        assert captions(archive.search("walk*")) == ["a man walking a dog on the street"]
        # porter stemming: the plural finds the singular and back
        assert len(archive.search("dogs")) == 2 and len(archive.search("cat")) == 1
        hit = archive.search('"red bag"')[0]
    assert (hit.camera, hit.frame_index, hit.score, hit.latency_ms) == ("front", 7, -0.4, 95.0)
    assert hit.wall_time == (NOW - dt.timedelta(minutes=30)).isoformat(timespec="milliseconds")


def test_ranking_bm25_then_newest_first(tmp_path):
    with Archive.open(tmp_path / "a.db") as archive:
        old, new = archive.add_many([record("a dog on the porch", ago) for ago in (50, 5)])
        short = archive.add(record("a dog", 40))
        long = archive.add(record("a person with a bag and a hat waiting by a gate with a dog", 1))
        hits = archive.search("dog")
    assert [h.id for h in hits] == [short, new, old, long]  # short text first; ties: newest first
    assert hits[0].rank < hits[1].rank == hits[2].rank < hits[3].rank


def test_camera_and_time_filters(archive_path):
    with Archive.open(archive_path, readonly=True) as archive:
        assert set(captions(archive.search("door", camera="front"))) == {
            "a man standing at the door", "a woman carrying a red bag at the door"}
        assert archive.search("door", camera="back") == []
        recent = archive.search("a", since=parse_time("1h", now=NOW))
        assert {h.caption for h in recent} == {"a man walking a dog on the street",
                                               "a woman carrying a red bag at the door",
                                               "two cats sitting on a fence"}
        window = archive.search("a", since=NOW - dt.timedelta(minutes=250),
                                until=(NOW - dt.timedelta(minutes=60)).isoformat())
        assert {h.caption for h in window} == {"a red car parked in the driveway",
                                               "a dog running on the grass"}
        assert archive.search("door", since=NOW + dt.timedelta(minutes=1)) == []


def test_time_window_finds_rows_that_arrived_late(tmp_path):
    """A record whose wall time is older than rows written before it (a backfill, a slow
    camera clock) is still found by since/until windows."""
    with Archive.open(tmp_path / "a.db") as archive:
        archive.add_many([record(f"a car number {i}", 100 - i) for i in range(50)])
        late = archive.add(record("a late truck", 500))
        archive.add_many([record(f"a bus number {i}", 40 - i) for i in range(20)])
        window = dict(since=NOW - dt.timedelta(minutes=510), until=NOW - dt.timedelta(minutes=490))
        assert [h.id for h in archive.search("truck", **window)] == [late]
        before = NOW - dt.timedelta(minutes=400)
        assert [h.id for h in archive.search("truck", until=before)] == [late]
        assert len(archive.search("car", until=NOW - dt.timedelta(minutes=80))) == 20
        assert len(archive.search("bus OR car", since=NOW - dt.timedelta(minutes=30))) == 10


def test_newest_candidates_bound_the_ranking(tmp_path):
    with Archive.open(tmp_path / "a.db") as archive:
        best = archive.add(record("dog", 90))  # the best bm25 match, but the oldest
        archive.add_many([record("a brown dog sitting on a porch", 80 - i) for i in range(30)])
        assert archive.search("dog", limit=1)[0].id == best
        assert archive.search("dog", limit=1, max_candidates=10)[0].id != best
        assert archive.search("dog", limit=1, max_candidates=None)[0].id == best


def test_records_validated_and_extra_keys_ignored(tmp_path):
    with Archive.open(tmp_path / "a.db") as archive:
        # watch's CaptionRecord says `caption` and has no score: both accepted
        rid = archive.add({"camera": "c", "stream_time": 1.5, "wall_time": "2026-11-25T10:00:00Z",
                           "frame_index": 3, "caption": "a cat", "dropped": 0})
        assert archive.get([rid])[0].score is None
        with pytest.raises(ArchiveError, match="missing 'camera'"):
            archive.add({k: v for k, v in record("x", 1).items() if k != "camera"})
        with pytest.raises(ArchiveError, match="bad value"):
            archive.add(record("x", 1) | {"wall_time": "yesterday"})
        with pytest.raises(ArchiveError, match="missing 'generated_text'"):
            archive.add_many([record("ok", 2), {"camera": "c"}])
        assert archive.count() == 1  # add_many validates everything before writing


def test_events_merge_consecutive_hits_per_camera(tmp_path):
    snap = tmp_path / "snap.jpg"
    snap.write_bytes(b"\xff\xd8jpeg")
    with Archive.open(tmp_path / "a.db") as archive:
        first = archive.add_many([record("a person at the door", 10.0),
                                  record("a person standing at the door", 9.5, snapshot=snap),
                                  record("a person at the door", 9.0)])
        later = archive.add(record("a person at the door", 2.0))
        other = archive.add(record("a person at the door", 9.6, camera="back"))
        merged = events(archive.search("person door"), gap_s=60)
    assert sorted(sorted(e.ids) for e in merged) == sorted([first, [later], [other]])
    run = next(e for e in merged if e.ids == first)
    assert run.snapshot == str(snap) and run.caption == "a person at the door"
    assert (run.start, run.end) == (run.hits[0].wall_time, run.hits[-1].wall_time)
    assert run.start < run.end and run.stream_start < run.stream_end
    assert len(events(run.hits, gap_s=20)) == 3  # its hits are 30 s apart


def test_snapshot_by_id_only(tmp_path):
    snap = tmp_path / "frame.jpg"
    snap.write_bytes(b"\xff\xd8jpeg")
    with Archive.open(tmp_path / "a.db") as archive:
        with_file = archive.add(record("a cat", 3, snapshot=str(snap)))
        without = archive.add(record("a dog", 2))
        gone = archive.add(record("a bird", 1, snapshot=tmp_path / "missing.jpg"))
        assert archive.snapshot(with_file) == snap
        assert archive.snapshot(without) is None and archive.snapshot(gone) is None
        assert archive.snapshot(999) is None


def test_cli_search_text_events_frames_and_json(archive_path, capsys):
    assert main(["search", "door", "--db", str(archive_path), "--camera", "front"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.split("\t")[1] == "front" for line in lines)
    assert {line.split("\t")[2] for line in lines} == {"a man standing at the door",
                                                       "a woman carrying a red bag at the door"}
    assert main(["search", "a", "--db", str(archive_path), "--json", "--frames", "--limit=4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4
    assert {"id", "camera", "wall_time", "caption", "snapshot", "rank"} <= set(rows[0])
    assert main(["search", '"red car" OR cats', "--db", str(archive_path), "--json"]) == 0
    merged = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {e["caption"] for e in merged} == {"a red car parked in the driveway",
                                              "two cats sitting on a fence"}
    assert all({"start", "end", "ids", "snapshot"} <= set(e) for e in merged)
    assert main(["search", "zebra", "--db", str(archive_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no captions match" in captured.err


def cli_error(argv: list[str], capsys) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgecap: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def test_cli_errors_are_one_line(archive_path, tmp_path, capsys):
    text = tmp_path / "notes.db"
    text.write_text("these are not the captions you are looking for\n" * 50)
    assert "not a SQLite database" in cli_error(["search", "x", "--db", str(text)], capsys)
    assert "no such archive" in cli_error(["search", "x", "--db", str(tmp_path / "no.db")], capsys)
    line = cli_error(["search", '"unclosed phrase', "--db", str(archive_path)], capsys)
    assert "unclosed phrase" in line and "unterminated string" in line
    assert "search query" in cli_error(["search", "t-shirt", "--db", str(archive_path)], capsys)
    with pytest.raises(SystemExit) as info:  # a bad time is a usage error
        main(["search", "x", "--db", str(archive_path), "--since", "yesterday"])
    assert info.value.code == 2 and "ISO 8601" in capsys.readouterr().err


def test_open_errors_name_the_path(tmp_path):
    not_db = tmp_path / "photo.jpg"
    not_db.write_bytes(b"\xff\xd8" + os.urandom(4096))
    with pytest.raises(ArchiveError, match="photo.jpg: not a SQLite database"):
        Archive.open(not_db)
    # A file where a folder is expected: unwritable even for root, who ignores permissions.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(ArchiveError, match="cannot open or write") as info:
        Archive.open(blocker / "events.db")
    assert isinstance(info.value, EdgecapError) and "\n" not in str(info.value)
    with pytest.raises(ArchiveError, match="is a folder"):
        Archive.open(tmp_path)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE invoices (n)").connection.close()
    with pytest.raises(ArchiveError, match="not an edgecap archive"):
        Archive.open(other)
    newer = tmp_path / "newer.db"
    Archive.open(newer).close()
    sqlite3.connect(newer).execute("PRAGMA user_version = 99").connection.close()
    with pytest.raises(ArchiveError, match="newer than this edgecap"):
        Archive.open(newer)


def test_read_only_archive_refuses_writes(archive_path):
    with Archive.open(archive_path, readonly=True) as archive:
        with pytest.raises(ArchiveError, match="read-only"):
            archive.add(record("x", 1))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions; "
                    "test_open_errors_name_the_path provokes the unwritable case instead")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ArchiveError, match="cannot open or write"):
            Archive.open(folder / "events.db")
    finally:
        folder.chmod(0o755)


def test_parse_time():
    assert parse_time("2h", now=NOW) == NOW - dt.timedelta(hours=2)
    assert parse_time("30m", now=NOW) == NOW - dt.timedelta(minutes=30)
    assert parse_time("7d", now=NOW.timestamp()) == NOW - dt.timedelta(days=7)
    assert parse_time("2026-11-25T14:00:00+02:00") == NOW
    assert parse_time("2026-11-25T12:00") == NOW  # no zone: UTC
    for bad in ("yesterday", "2x", "", "-2h"):
        with pytest.raises(ArchiveError, match="expected a duration"):
            parse_time(bad)


def add_with_snapshots(archive: Archive, folder: Path, minutes_ago: list[float]) -> list[int]:
    folder.mkdir(exist_ok=True)
    ids = []
    for n, ago in enumerate(minutes_ago):
        snap = folder / f"{ago:08.2f}-{n}.jpg"
        snap.write_bytes(os.urandom(8192))
        ids.append(archive.add(record(f"a person number {n} at the door", ago, snapshot=snap)))
    return ids


def test_prune_to_disk_budget_keeps_newest(tmp_path):
    snaps = tmp_path / "snaps"
    with Archive.open(tmp_path / "a.db") as archive:
        old = add_with_snapshots(archive, snaps, [3 * 1440 - m for m in range(400)])  # 3.2 MB
        newest = add_with_snapshots(archive, snaps, [50 - m for m in range(10)])
        stats = archive.prune(max_disk_mb=0.5, now=NOW)
        assert stats.disk_bytes_before > 3 << 20
        assert stats.disk_bytes_after == archive.disk_bytes() <= 0.5 * (1 << 20)
        kept = {h.id for h in archive.get(old + newest)}
        assert set(newest) <= kept and len(kept) < (1 << 19) // 8192  # 8 KB snapshots
        assert stats.rows_deleted == stats.snapshots_deleted == len(old + newest) - len(kept)
        assert len(kept) > len(newest)  # just enough went: some old rows still fit
        assert sorted(kept - set(newest)) == old[-(len(kept) - len(newest)):]  # the oldest went
        assert len(list(snaps.iterdir())) == len(kept)
        assert all(archive.snapshot(i) is not None for i in newest)
        assert archive.search("person", since=NOW - dt.timedelta(hours=1)) != []
        conn = sqlite3.connect(tmp_path / "a.db")
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.execute("INSERT INTO captions_fts(captions_fts) VALUES ('integrity-check')")
        conn.close()


def test_newest_hour_is_never_pruned(tmp_path):
    with Archive.open(tmp_path / "a.db") as archive:
        recent = add_with_snapshots(archive, tmp_path / "s", [59, 30, 1])
        assert archive.prune(max_disk_mb=0.001, keep_days=0, now=NOW).rows_deleted == 0
    # An archive whose cameras went quiet two days ago keeps its newest hour of captions too.
    with Archive.open(tmp_path / "b.db") as archive:
        stale = [archive.add(record("a cat", 2 * 1440 + m)) for m in (120, 90, 50, 10)]
        assert archive.prune(keep_days=1, max_disk_mb=0.001, now=NOW).rows_deleted == 2
        assert [h.id for h in archive.get(stale)] == stale[2:]


def test_prune_by_age(tmp_path):
    with Archive.open(tmp_path / "a.db") as archive:
        ids = archive.add_many([record(f"a car {d}", d * 1440) for d in range(9, -1, -1)])
        stats = archive.prune(keep_days=3.5, now=NOW)
        assert stats.rows_deleted == 6 and [h.id for h in archive.get(ids)] == ids[6:]
        # Age goes by arrival: a late record with an old time goes with its neighbours.
        late = archive.add(record("a late car", 20 * 1440))
        assert archive.prune(keep_days=3.5, now=NOW).rows_deleted == 0
        # ... and shares their protection as part of the archive's newest hour
        assert archive.prune(keep_days=3.5, now=NOW + dt.timedelta(days=4)).rows_deleted == 3
        assert [h.id for h in archive.get(ids + [late])] == [ids[-1], late]


def write_rows(path: str, camera: str, n: int) -> None:
    with Archive.open(path) as archive:
        for i in range(n):
            archive.add(record(f"a person at the {camera} door {i}", n - i, camera=camera))


def test_two_processes_write_at_once(tmp_path):
    path = str(tmp_path / "shared.db")
    Archive.open(path).close()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=write_rows, args=(path, camera, 150))
               for camera in ("front", "back")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    with Archive.open(path, readonly=True) as archive:
        assert archive.count() == 300
        for camera in ("front", "back"):
            hits = archive.search("person", camera=camera, limit=1000)
            assert sorted(int(h.caption.split()[-1]) for h in hits) == list(range(150))


CHILD = """
import sys
from edgecap.archive.store import Archive
sys.path.insert(0, sys.argv[2])
from test_archive import record
with Archive.open(sys.argv[1]) as archive:
    for i in range(1_000_000):
        batch = [record(f"a person at the door {i} {j}", 1) for j in range(i % 3 + 1)]
        print(*archive.add_many(batch), flush=True)  # printed only after the commit
"""


def test_killed_writer_leaves_a_sound_archive(tmp_path):
    path = tmp_path / "crash.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(Path(__file__).parent)],
                             stdout=subprocess.PIPE, text=True)
    reported: list[int] = []
    try:
        while len(reported) < 300:
            line = child.stdout.readline()
            assert line, "the writer exited early"
            reported += map(int, line.split())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
    reported += [int(i) for line in rest.splitlines() for i in line.split()]
    assert child.returncode == -signal.SIGKILL
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.execute("INSERT INTO captions_fts(captions_fts) VALUES ('integrity-check')")
    stored = {row[0] for row in conn.execute("SELECT id FROM captions")}
    conn.close()
    assert set(reported) <= stored
    with Archive.open(path) as archive:  # and it opens and takes more rows
        assert archive.add(record("after the crash", 0)) > max(stored)


def test_search_help_explains_query_syntax(capsys):
    with pytest.raises(SystemExit) as info:
        main(["search", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    for words in ('"red car"', "dog OR cat", "person NOT dog", "walk*", "--since", "--frames"):
        assert words in out


def tagged(person: float, extra: str | None = None) -> list[dict]:
    tags = [{"label": "person", "score": person}, {"label": "dog", "score": 0.1}]
    return tags + ([{"label": extra, "score": 0.7}] if extra else [])


def test_tag_terms_search_presence_scores(tmp_path, capsys):
    path = tmp_path / "events.db"
    with Archive.open(path) as archive:
        archive.add_many([
            record("a man at the old gate", 300, tags=tagged(0.95)),
            record("an empty kitchen with a stove", 50, tags=tagged(0.04, "Dutch oven")),
            record("a man standing at the door", 40, tags=tagged(0.97)),
            record("a man in a living room", 30, tags=tagged(0.3)),  # the head says no
            record("a person at the door", 20),  # an ungrounded model: no tags at all
        ])
        assert captions(archive.search("tag:person")) == ["a man standing at the door",
                                                          "a man at the old gate"]
        assert captions(archive.search("living tag:person>=0.2")) == ["a man in a living room"]
        assert captions(archive.search("living tag:person")) == []
        with pytest.raises(ArchiveError, match="tag:LABEL>=SCORE"):
            archive.search('tag:"dutch oven" tag:person<=1')
        assert captions(archive.search('tag:"Dutch oven"')) == ["an empty kitchen with a stove"]
        assert captions(archive.search("door")) == ["a person at the door",
                                                     "a man standing at the door"]
        with pytest.raises(ArchiveError, match="between 0 and 1"):
            archive.search("tag:person>=high")
        with pytest.raises(ArchiveError, match="bad tags"):
            archive.add(record("x", 1, tags=[{"label": "person"}]))
        # Pruned captions take their tags with them.
        archive.prune(keep_days=2 / 24, now=NOW)
        assert captions(archive.search("tag:person")) == ["a man standing at the door"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM captions_tags WHERE caption_id = 1"
                            ).fetchone()[0] == 0
    assert main(["search", "tag:person>=0.9", "--db", str(path), "--json", "--frames"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["caption"] for line in lines] == ["a man standing at the door"]


def test_version_1_archive_gains_tags_when_opened_to_write(tmp_path):
    path = tmp_path / "old.db"
    with Archive.open(path) as archive:
        archive.add(record("a man at the door", 5))
    with sqlite3.connect(path) as conn:  # what an archive written before tags looked like
        conn.executescript("DROP TABLE captions_tags; DROP TRIGGER captions_tags_ad; "
                           "PRAGMA user_version = 1;")
    with Archive.open(path, readonly=True) as archive:  # a reader does not upgrade it
        with pytest.raises(ArchiveError, match="predates tags"):
            archive.search("tag:person")
        assert captions(archive.search("man")) == ["a man at the door"]
    with Archive.open(path) as archive:
        archive.add(record("a man at the gate", 1, tags=tagged(0.9)))
        assert captions(archive.search("tag:person")) == ["a man at the gate"]
        assert captions(archive.search("man")) == ["a man at the gate", "a man at the door"]


def test_search_parameters_are_declared_once(archive_path, capsys):
    """The CLI's flags, the HTTP fields and the OpenAPI parameters all come from SEARCH_FIELDS,
    and the same search asked both ways is the same SearchQuery."""
    from edgecap.archive import SearchQuery
    from edgecap.archive.query import SEARCH_FIELDS
    from edgecap.serve.openapi import openapi_document

    documented = openapi_document(archive=True)["paths"]["/v1/events"]["get"]["parameters"]
    assert [p["name"] for p in documented] == [f.name for f in SEARCH_FIELDS]
    assert "gap" in {p["name"] for p in documented}
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    usage = capsys.readouterr().out
    assert all(f"--{f.name}" in usage for f in SEARCH_FIELDS if f.name != "q")
    http = SearchQuery.from_fields({"q": "door", "camera": "front", "since": "2026-11-25T07:00Z",
                                    "limit": "3", "gap": "20", "frames": "true"})
    parser = __import__("argparse").ArgumentParser()
    SearchQuery.add_arguments(parser)
    cli = SearchQuery.from_args(parser.parse_args(["door", "--camera", "front", "--since",
                                                   "2026-11-25T07:00Z", "--limit", "3",
                                                   "--gap", "20", "--frames"]))
    assert http == cli
    assert SearchQuery.from_fields({"q": "door"}) == SearchQuery.from_args(
        parser.parse_args(["door"]))


def test_search_bounds_hold_on_the_cli_too(archive_path, capsys):
    """A gap the HTTP API refuses is a usage error on the CLI; the hit limit caps only what one
    HTTP request may ask for."""
    from edgecap.archive import SearchQuery

    for bad in ("-1", "nan", "1e999"):
        with pytest.raises(SystemExit) as info:
            main(["search", "door", "--db", str(archive_path), "--gap", bad])
        assert info.value.code == 2 and "gap" in capsys.readouterr().err
        with pytest.raises(ValueError, match="gap must be"):
            SearchQuery.from_fields({"q": "door", "gap": bad})
    assert main(["search", "a", "--db", str(archive_path), "--frames", "--limit", "5000"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(CAPTIONS)
    with pytest.raises(ValueError, match="limit must be an integer from 1 to 1000"):
        SearchQuery.from_fields({"q": "door", "limit": "5000"})


def test_hits_and_events_serialise_themselves(archive_path, tmp_path):
    """One JSON form for the CLI and the server; the server's names snapshots by URL only."""
    snap = tmp_path / "snap.jpg"
    snap.write_bytes(b"\xff\xd8jpeg")
    with Archive.open(archive_path) as archive:
        archive.add(record("a cat on the door mat", 1, snapshot=str(snap)))
        hit = archive.search("mat")[0]
        event = events(archive.search("door"))[0]
    assert json.loads(json.dumps(hit.to_dict()))["snapshot"] == str(snap)
    served = hit.to_dict(snapshot_url=lambda i: f"/snap/{i}")
    assert "snapshot" not in served and served["snapshot_url"] == f"/snap/{hit.id}"
    assert list(served) == [*list(hit.to_dict())[:-2], "rank", "snapshot_url"]
    assert "hits" not in event.to_dict() and event.to_dict()["ids"] == event.ids
    assert event.to_dict(snapshot_url=lambda i: f"/snap/{i}")["snapshot_url"] == f"/snap/{hit.id}"


def test_alert_rules_match_what_search_finds(archive_path):
    """Alerts index a caption with the archive's own tokenizer, so a rule's query and an
    `edgecap search` for it agree on every caption."""
    from edgecap.alerts.rules import AlertRule, CaptionMatcher, CommandTarget

    queries = ["dogs", "man door", '"red car"', "cat*", "walk*", "man NOT dog", "sitting OR bags"]
    target = CommandTarget(("true",))
    matcher = CaptionMatcher([AlertRule(match=q, targets=(target,)) for q in queries])
    with Archive.open(archive_path, readonly=True) as archive:
        for text, _, _ in CAPTIONS:
            found = {q for q in queries if text in captions(archive.search(q))}
            assert {q for q, hit in zip(queries, matcher.matches(text)) if hit} == found, text
