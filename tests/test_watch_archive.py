"""`edgecap watch --archive` on real videos: rows, times, snapshots, search by scene, crash
safety under SIGKILL, retention and bad paths. The shipped default model captions real photos,
so captions hold real words to search for."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("av")

from edgecap.archive.store import Archive  # noqa: E402
from edgecap.cli.main import main  # noqa: E402

from test_watch import encode_video  # noqa: E402

SCENES = ["cat", "coffee", "astronaut", "rocket"]
PHOTOS = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def scenes_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("archive-video") / "door.mp4"
    encode_video(path, [PHOTOS / f"{name}.jpg" for name in SCENES])  # one second each
    return path


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_archive_holds_every_caption_and_finds_a_scene_by_its_words(scenes_video, tmp_path, capsys):
    db, snaps, out = tmp_path / "events.db", tmp_path / "snaps", tmp_path / "out.jsonl"
    assert main(["watch", str(scenes_video), "--archive", str(db), "--camera", "door",
                 "--snapshots", str(snaps), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reason"] for r in records[:1]] == ["first"] and len(records) >= len(SCENES)
    with Archive.open(db, readonly=True) as archive:
        assert archive.count() == len(records)
        rows = archive.get(range(1, len(records) + 1))
    for record, row in zip(records, rows):  # one row per caption, with the stream's own times
        assert row.camera == record["camera"] == "door"
        assert row.caption == record["generated_text"] and row.frame_index == record["frame_index"]
        assert row.stream_time == pytest.approx(record["stream_time"])
        assert row.wall_time == record["wall_time"]
        assert datetime.datetime.fromisoformat(row.wall_time).tzinfo is not None
        assert Path(row.snapshot).is_file() and Path(row.snapshot).parent == snaps.resolve()
    # A word only scene 3 (stream seconds 2-3) was described with finds scene 3's span.
    scene3 = [r for r in records if 2.0 <= r["stream_time"] < 3.0]
    others = set().union(*(words(r["generated_text"]) for r in records if r not in scene3))
    unique = sorted(set().union(*(words(r["generated_text"]) for r in scene3)) - others)
    assert unique, f"scene 3's captions share all their words with the others: {records}"
    capsys.readouterr()
    assert main(["search", unique[0], "--db", str(db), "--json", "--frames"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits and all(2.0 <= hit["stream_time"] < 3.0 for hit in hits)


def watcher(video: Path, db: Path, out: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "edgecap.cli", "watch", str(video), "--archive", str(db),
               "--camera", "door", "--out", str(out), "--realtime", "--heartbeat", "0.05"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("ab"))


def test_sigkill_never_loses_a_reported_caption(scenes_video, tmp_path):
    """Five watchers killed mid-run: the db stays sound and holds every record in --out."""
    db, out, log = tmp_path / "events.db", tmp_path / "out.jsonl", tmp_path / "watch.log"
    for attempt in range(5):
        proc = watcher(scenes_video, db, out, log)
        lines_before = len(out.read_text().splitlines()) if out.exists() else 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(out.read_text().splitlines()) >= lines_before + 2 + attempt:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            archived = set(conn.execute("SELECT camera, frame_index, wall_time FROM captions"))
        reported = []
        for line in out.read_text().splitlines():
            try:
                reported.append(json.loads(line))
            except ValueError:  # a line torn by the kill was never fully reported
                continue
        assert len(reported) > lines_before, log.read_text()
        for record in reported:
            assert (record["camera"], record["frame_index"], record["wall_time"]) in archived


def old_rows(db: Path, folder: Path, count: int, days_ago: float) -> list[Path]:
    """Captions an hour apart from ``days_ago`` on, each with a snapshot file of 20 kB."""
    folder.mkdir(exist_ok=True)
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days_ago)
    files = []
    with Archive.open(db) as archive:
        for i in range(count):
            snapshot = folder / f"old-{i}.jpg"
            snapshot.write_bytes(os.urandom(20_000))
            files.append(snapshot)
            archive.add({"camera": "door", "stream_time": float(i), "frame_index": i,
                         "wall_time": (when + datetime.timedelta(hours=i)).isoformat(),
                         "generated_text": "an old caption", "score": 0.0, "latency_ms": 1.0,
                         "snapshot": str(snapshot)})
    return files


def test_disk_budget_prunes_old_rows_and_their_snapshots_but_keeps_the_new(scenes_video, tmp_path):
    db, snaps = tmp_path / "events.db", tmp_path / "snaps"
    old = old_rows(db, tmp_path / "old", 50, days_ago=3)  # 1 MB of snapshots
    assert main(["watch", str(scenes_video), "--archive", str(db), "--snapshots", str(snaps),
                 "--max-disk-mb", "0.5", "--out", str(tmp_path / "out.jsonl")]) == 0
    with Archive.open(db, readonly=True) as archive:
        # The budget, plus the slack of the rows it may not prune: the old rows' newest hour and
        # this run's captions (their snapshots and database pages).
        assert archive.disk_bytes() <= 0.5 * 2**20 + 200_000
        kept = archive.search("old", limit=100)
        fresh = archive.count() - len(kept)
    assert fresh >= len(SCENES)  # every new caption stays: the newest hour is never pruned
    assert len(kept) < 50 and sum(p.exists() for p in old) == len(kept)


def test_bad_archive_paths_are_one_line_errors(scenes_video, tmp_path, capsys):
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("hello, not a database\n" * 100)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [(["--archive", str(not_sqlite)], "not a SQLite database"),
             (["--archive", str(blocker / "events.db")], str(blocker)),
             (["--archive", str(tmp_path / "ok.db"), "--snapshots", str(blocker / "snaps")],
              "snapshot folder"),
             (["--snapshots", str(tmp_path / "snaps")], "need --archive")]
    for extra, expected in cases:
        assert main(["watch", str(scenes_video), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0], err
