"""`edgecap watch --config`: four real looping HTTP streams on 127.0.0.1 through one model.
Every camera gets captions; killing one stream's server leaves the others' rate unchanged, and
the killed one reconnects. Also files through one config, and config errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("av")

from edgecap.cli.main import main  # noqa: E402

from test_watch import encode_video, free_port, kill_server, needs_ffmpeg, start_server  # noqa: E402

CAMERAS = ["door", "yard", "garage", "hall"]
WINDOW_S = 5.0


@pytest.fixture(scope="module")
def videos(tmp_path_factory, sample_photos) -> dict[str, Path]:
    """One two-scene video per camera, from different photos."""
    folder = tmp_path_factory.mktemp("camera-videos")
    photos = sample_photos(2 * len(CAMERAS))
    paths = {}
    for i, name in enumerate(CAMERAS):
        paths[name] = folder / f"{name}.mp4"
        encode_video(paths[name], photos[2 * i : 2 * i + 2], seconds=2.0)
    return paths


def write_config(path: Path, sources: dict[str, str], **camera_options) -> Path:
    lines = []
    for name, source in sources.items():
        lines += ["[[camera]]", f'name = "{name}"', f'source = "{source}"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in camera_options.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def stream_command(video: Path, url: str) -> list[str]:
    return ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i",
            str(video), "-c:v", "mpeg2video", "-q:v", "4", "-f", "mpegts", "-listen", "1", url]


def per_camera(out: Path) -> Counter:
    text = out.read_text() if out.exists() else ""
    return Counter(json.loads(line)["camera"] for line in text.splitlines() if line.endswith("}"))


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def rates(out: Path, seconds: float) -> dict[str, float]:
    before = per_camera(out)
    time.sleep(seconds)
    after = per_camera(out)
    return {name: (after[name] - before[name]) / seconds for name in CAMERAS}


@needs_ffmpeg
def test_four_live_cameras_one_model_and_a_dead_stream_stalls_no_one(tiny_export, videos, tmp_path):
    urls = {name: f"http://127.0.0.1:{free_port()}/{name}.ts" for name in CAMERAS}
    servers = {name: start_server(stream_command(videos[name], urls[name]), tmp_path / f"{name}.log")
               for name in CAMERAS}
    # A caption every quarter second of stream time per camera: the rate is set by the streams,
    # not by the machine, so it can be compared before and after the kill.
    config = write_config(tmp_path / "cameras.toml", urls, heartbeat=0.25, timeout_s=2.0)
    out, log = tmp_path / "out.jsonl", tmp_path / "watch.log"
    watcher = subprocess.Popen([sys.executable, "-m", "edgecap.cli", "watch", "--config",
                                str(config), "--model", str(tiny_export), "--out", str(out)],
                               stderr=log.open("w"))
    try:
        assert wait_until(lambda: min(per_camera(out)[n] for n in CAMERAS) >= 3, 90), \
            log.read_text()
        before = rates(out, WINDOW_S)
        kill_server(servers.pop("door"))
        time.sleep(1.0)  # the dead camera's reader notices; the others must not
        after = rates(out, WINDOW_S)
        for name in CAMERAS[1:]:
            assert before[name] > 0 and abs(after[name] - before[name]) <= 0.2 * before[name], \
                (before, after)
        assert after["door"] == 0
        resumed = per_camera(out)["door"]
        servers["door"] = start_server(stream_command(videos["door"], urls["door"]),
                                       tmp_path / "door.log")
        assert wait_until(lambda: per_camera(out)["door"] >= resumed + 3, 60), log.read_text()
    finally:
        watcher.send_signal(signal.SIGTERM)
        code = watcher.wait(timeout=60)
        for server in servers.values():
            kill_server(server)
    summary = log.read_text()
    assert code == 0, summary
    door = next(line for line in summary.splitlines() if line.startswith("edgecap: door:"))
    assert int(door.split(" reconnects")[0].rsplit(" ", 1)[1]) >= 1, summary


def test_files_through_one_config_end_when_every_file_has_ended(tiny_export, videos, tmp_path,
                                                                 capsys):
    config = write_config(tmp_path / "cameras.toml", {n: str(videos[n]) for n in CAMERAS[:3]})
    out, db = tmp_path / "out.jsonl", tmp_path / "events.db"
    assert main(["watch", "--config", str(config), "--model", str(tiny_export), "--out", str(out),
                 "--archive", str(db)]) == 0
    counts = per_camera(out)
    assert set(counts) == set(CAMERAS[:3]) and all(count >= 2 for count in counts.values())
    from edgecap.archive.store import Archive

    with Archive.open(db, readonly=True) as archive:
        rows = archive.get(range(1, sum(counts.values()) + 1))
    assert Counter(row.camera for row in rows) == counts


def test_config_errors_name_file_line_and_key(tiny_export, videos, tmp_path, capsys):
    config = tmp_path / "cameras.toml"
    config.write_text(f'[[camera]]\nname = "door"\nsource = "{videos["door"]}"\nfsp = 2\n')
    config.chmod(0o600)  # owner-only, as the docs ask: no readability warning beside the error
    assert main(["watch", "--config", str(config), "--model", str(tiny_export)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{config}:4" in err[0] and "fsp" in err[0], err
    assert main(["watch", str(videos["door"]), "--config", str(config)]) == 2
    assert "not both" in capsys.readouterr().err


class Hooks:
    """A webhook receiver on 127.0.0.1 that keeps every JSON body it is sent."""

    def __init__(self):
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_an_alert_rule_fires_once_per_event_through_watch(tmp_path, capsys):
    """The default model captions four scenes; a rule on a word of scene 2 only, with a
    heartbeat captioning that scene several times, posts exactly one alert."""
    photos = Path(__file__).resolve().parent / "data"
    video = tmp_path / "door.mp4"
    encode_video(video, [photos / f"{n}.jpg" for n in ("cat", "coffee", "astronaut", "rocket")])
    config = write_config(tmp_path / "plain.toml", {"door": str(video)}, heartbeat=0.3)
    assert main(["watch", "--config", str(config)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    scene2 = [r for r in records if 1.0 <= r["stream_time"] < 2.0]
    words = lambda rs: {w for r in rs for w in r["generated_text"].split()}  # noqa: E731
    unique = sorted(words(scene2) - words([r for r in records if r not in scene2]))
    assert len(scene2) >= 2 and unique, records
    hooks = Hooks()
    try:
        rules = (f'[[alert]]\nmatch = "{unique[0]}"\ncooldown_s = 60\n'
                 f'webhook = "{hooks.url}"\n')
        alerting = tmp_path / "alerts.toml"
        alerting.write_text(config.read_text() + rules)
        assert main(["watch", "--config", str(alerting), "--out", str(tmp_path / "o.jsonl")]) == 0
    finally:
        hooks.close()
    assert len(hooks.received) == 1, hooks.received
    alert = hooks.received[0]
    assert alert["camera"] == "door" and unique[0] in alert["generated_text"].split(), alert
    assert 1.0 <= alert["stream_time"] < 2.0 and alert["rule"] and alert["wall_time"]


# ---------------------------------------------------------------- inference lanes


def records_by_camera(out: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for line in out.read_text().splitlines():
        record = json.loads(line)
        found.setdefault(record["camera"], []).append(record)
    return found


def test_two_lanes_caption_the_same_frames_as_one_lane(tiny_export, videos, tmp_path, capsys,
                                                       monkeypatch):
    """Files are read losslessly, so every frame meets its camera's scene gate in order and the
    captioned frames are fixed: one lane (batches across cameras, two-thread sessions) and two
    lanes (other batches, one-thread sessions shared by both) give the same records."""
    import edgecap.sessions

    built = []

    def counting_build_session(*args, **kwargs):  # the real builder, counted
        session = real_build_session(*args, **kwargs)
        built.append(session)
        return session

    real_build_session = edgecap.sessions.build_session
    monkeypatch.setattr(edgecap.sessions, "build_session", counting_build_session)
    config = write_config(tmp_path / "cameras.toml", {n: str(videos[n]) for n in CAMERAS[:3]},
                          heartbeat=0.3)
    runs = {}
    for lanes in (1, 2):
        out = tmp_path / f"lanes-{lanes}.jsonl"
        built.clear()
        assert main(["watch", "--config", str(config), "--model", str(tiny_export), "--out",
                     str(out), "--threads", "2", "--lanes", str(lanes)]) == 0
        # One set of weights whatever the lanes: an encoder and a decoder session, with the
        # threads the lanes' own do not use (two lanes of one thread: no pool).
        assert len(built) == 2
        assert {s.get_session_options().intra_op_num_threads for s in built} == {3 - lanes}
        runs[lanes] = records_by_camera(out)
        summary = capsys.readouterr().err
        lane_counts = [int(n) for n in re.findall(r"lane \d+: (\d+) captions", summary)]
        assert len(lane_counts) == lanes and all(lane_counts), summary  # every lane worked
        assert sum(lane_counts) == sum(len(r) for r in runs[lanes].values())
    keys = ("frame_index", "stream_time", "reason", "generated_text", "token_ids", "score")
    for camera in CAMERAS[:3]:
        one, two = ([{k: r[k] for k in keys} for r in runs[n][camera]] for n in (1, 2))
        assert len(one) >= 4 and one == two, camera


def fill(feeds, photos, index: int) -> None:
    """A fresh, real frame in every empty mailbox (as the reader threads would put them)."""
    from edgecap.watch.sources import Frame

    for camera, feed in enumerate(feeds):
        if feed.mailbox.frame is None:
            image = Image.open(photos[camera % len(photos)]).convert("RGB")
            feed.mailbox.put(Frame(image, timestamp=index / 10, index=index), feed.stop)


def camera_feeds(count: int, tmp_path: Path):
    """``count`` camera feeds on real (empty) folder sources; their readers are not started,
    the test fills the mailboxes itself."""
    from edgecap.watch.sources import FolderSource
    from edgecap.watch.stream import CameraFeed, WatchOptions

    stop = threading.Event()
    feeds = []
    for camera in range(count):
        (tmp_path / f"cam{camera}").mkdir()
        feeds.append(CameraFeed(FolderSource(str(tmp_path / f"cam{camera}")),
                                WatchOptions(camera=f"cam{camera}"), None, stop))
    return feeds


@pytest.mark.parametrize(("cameras", "lanes", "max_batch"), [(5, 2, 8), (5, 1, 2), (7, 3, 8)])
def test_the_scheduler_serves_every_camera_before_any_twice(photos, tmp_path, cameras, lanes,
                                                            max_batch):
    """Every camera always has a fresh frame: lanes take their share in turn, and across the
    takes each camera is served once before any camera is served again (round-robin)."""
    from edgecap.watch.cameras import Scheduler

    feeds = camera_feeds(cameras, tmp_path)
    scheduler = Scheduler(feeds, lanes, max_batch)
    served, held = [], []
    for take in range(4 * cameras):
        fill(feeds, photos, take)
        if len(held) == lanes:  # every lane busy: the oldest finishes first
            scheduler.release(held.pop(0))
        work = scheduler.take()
        assert work and len(work) <= scheduler.share
        names = [feed.options.camera for feed, _ in work]
        assert len(set(names)) == len(names)  # one frame per camera per batch
        assert not set(names) & {f.options.camera for w in held for f, _ in w}  # one lane each
        served += names
        held.append(work)
    for start in range(0, len(served) - cameras + 1, cameras):
        assert sorted(served[start : start + cameras]) == sorted(f"cam{i}" for i in range(cameras))


def test_a_busy_camera_waits_and_the_others_go_on(photos, tmp_path):
    """A camera held by a slow lane is skipped, not waited for; it is served again at once
    when its lane is done."""
    from edgecap.watch.cameras import Scheduler

    feeds = camera_feeds(3, tmp_path)
    scheduler = Scheduler(feeds, lanes=3, max_batch=8)
    fill(feeds, photos, 0)
    slow = scheduler.take()
    assert [f.options.camera for f, _ in slow] == ["cam0"]
    for take in range(1, 7):  # the other lanes keep serving cam1 and cam2
        fill(feeds, photos, take)
        work = scheduler.take()
        assert {f.options.camera for f, _ in work} <= {"cam1", "cam2"} and work
        scheduler.release(work)
    scheduler.release(slow)
    fill(feeds, photos, 7)
    assert [f.options.camera for f, _ in scheduler.take()] == ["cam0"]


def test_lanes_share_live_cameras_fairly(videos, tmp_path):
    """Four cameras paced as live streams, every frame wanted, through the default model on two
    lanes: the machine cannot caption them all, and the scheduler spreads what it can evenly."""
    config = write_config(tmp_path / "cameras.toml", {n: str(videos[n]) for n in CAMERAS},
                          realtime=True, heartbeat=0.001)
    out = tmp_path / "out.jsonl"
    assert main(["watch", "--config", str(config), "--out", str(out), "--threads", "2",
                 "--lanes", "2"]) == 0
    counts = per_camera(out)
    assert min(counts[n] for n in CAMERAS) >= 0.5 * max(counts.values()) > 0, counts


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_every_lane_and_loses_no_caption(tiny_export, sample_photos, tmp_path,
                                                        sig):
    """Ctrl-C or SIGTERM mid-run: exit 0, every line whole, and the file holds exactly the
    captions the summary counted, lane by lane and camera by camera."""
    sources = {}
    for i, name in enumerate(CAMERAS[:3]):
        sources[name] = str(tmp_path / f"{name}.mp4")
        encode_video(Path(sources[name]), sample_photos(6)[2 * i : 2 * i + 2], seconds=10.0)
    config = write_config(tmp_path / "cameras.toml", sources, realtime=True, heartbeat=0.05)
    out, log = tmp_path / "out.jsonl", tmp_path / "watch.log"
    watcher = subprocess.Popen([sys.executable, "-m", "edgecap.cli", "watch", "--config",
                                str(config), "--model", str(tiny_export), "--out", str(out),
                                "--threads", "2", "--lanes", "2"], stderr=log.open("w"))
    try:
        assert wait_until(lambda: sum(per_camera(out).values()) >= 12, 60), log.read_text()
        watcher.send_signal(sig)
        code = watcher.wait(timeout=30)
    finally:
        watcher.kill()
    summary = log.read_text()
    assert code == 0, summary
    lines = out.read_text().splitlines()
    assert out.read_text().endswith("\n") and all(json.loads(line) for line in lines)
    counts = per_camera(out)
    for name in CAMERAS[:3]:
        assert f"edgecap: {name}: {counts[name]} captions," in summary, summary
    lane_counts = [int(n) for n in re.findall(r"lane \d+: (\d+) captions", summary)]
    assert len(lane_counts) == 2 and sum(lane_counts) == len(lines), summary
    assert sum(counts.values()) < 3 * 200  # stopped part way through the 20 s streams


def test_a_reader_that_leaves_early_ends_every_lane(tiny_export, videos):
    """Closing the generator after a few records (a consumer that failed) stops the lanes and
    the readers instead of leaving them waiting for room."""
    from edgecap import Captioner
    from edgecap.watch.cameras import watch_cameras
    from edgecap.watch.sources import open_source
    from edgecap.watch.stream import CameraFeed, WatchOptions

    captioner = Captioner(tiny_export, cpu_threads=1)
    stop, ready = threading.Event(), threading.Event()
    feeds = [CameraFeed(open_source(str(videos[n])), WatchOptions(camera=n, heartbeat_s=0.01),
                        captioner.options(), stop, ready) for n in CAMERAS]
    records = watch_cameras(feeds, captioner, stop, ready, max_batch=1, lanes=2)
    assert len([next(records) for _ in range(3)]) == 3
    records.close()
    assert stop.is_set()
    assert not [t.name for t in threading.enumerate()
                if t.name.startswith(("edgecap-lane", "edgecap-reader")) and t.is_alive()]


def test_lane_metrics_are_exposed_per_lane():
    from prometheus_client import generate_latest

    from edgecap.watch.lanes import LaneStats
    from edgecap.watch.metrics import CameraMetrics

    metrics, stats = CameraMetrics(["door"]), LaneStats(2)
    metrics.track_lanes(stats)
    stats.add(1, captions=3, seconds=0.5)
    text = generate_latest(metrics.registry).decode()
    assert 'edgecap_lane_captions_total{lane="0"} 0.0' in text
    assert 'edgecap_lane_captions_total{lane="1"} 3.0' in text
    assert 'edgecap_lane_busy_seconds_total{lane="1"} 0.5' in text


def test_bad_lanes_are_usage_errors(tiny_export, videos, tmp_path, capsys):
    config = write_config(tmp_path / "cameras.toml", {"door": str(videos["door"])})
    config.chmod(0o600)
    for bad in ("0", "65", "two", "1.5"):
        with pytest.raises(SystemExit) as exit_info:
            main(["watch", "--config", str(config), "--lanes", bad])
        assert exit_info.value.code == 2
        assert "--lanes" in capsys.readouterr().err
    assert main(["watch", str(videos["door"]), "--lanes", "2"]) == 2
    assert "--lanes takes --config" in capsys.readouterr().err
    config.write_text(config.read_text().replace("[[camera]]", "lanes = 0\n\n[[camera]]", 1))
    assert main(["watch", "--config", str(config), "--model", str(tiny_export)]) == 1
    assert f"{config}:1: lanes: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(("cameras", "lanes"), [(3, 2), (5, 2), (7, 3)])
def test_a_lane_that_finishes_sooner_favours_no_camera(photos, tmp_path, cameras, lanes):
    """Lane 0 takes twice as long per batch as the others (a slower core, a longer caption):
    the cameras are still served in turn: no camera gets ahead of another by more than one
    batch, however long the run."""
    from edgecap.watch.cameras import Scheduler

    feeds = camera_feeds(cameras, tmp_path)
    scheduler = Scheduler(feeds, lanes, max_batch=8)
    served = {f"cam{i}": 0 for i in range(cameras)}
    held: dict[int, tuple[int, list]] = {}  # lane -> (tick it finishes, its work)
    for tick in range(60):
        for lane, (done, work) in list(held.items()):
            if done <= tick:
                scheduler.release(work)
                del held[lane]
        fill(feeds, photos, tick)
        for lane in range(lanes):
            if lane not in held:
                work = scheduler.take()
                assert len(work) == scheduler.share  # a free lane always finds a full share
                for feed, _ in work:
                    served[feed.options.camera] += 1
                held[lane] = (tick + (2 if lane == 0 else 1), work)
    assert max(served.values()) - min(served.values()) <= scheduler.share, served


def test_a_failing_group_loses_no_other_cameras_record(tiny_export, photos, tmp_path):
    """Cameras with different options share a lane's batch; when one options group fails, the
    records the groups before it made (their cameras already moved on) still come out, with the
    error for the lane to raise after them."""
    from edgecap import Captioner
    from edgecap.watch.cameras import Scheduler, _caption_work
    from edgecap.watch.sources import FolderSource
    from edgecap.watch.stream import CameraFeed, WatchOptions

    class BeamsFail(Captioner):
        def caption_grouped(self, items, admit=None):
            for members, outcome in super().caption_grouped(items, admit):
                yield members, (RuntimeError("beam group failed")
                                if members[0].options.num_beams == 2 else outcome)

    captioner = BeamsFail(tiny_export, cpu_threads=1)
    stop = threading.Event()
    feeds = []
    for camera, generation in enumerate([captioner.options(), captioner.options(num_beams=2)]):
        (tmp_path / f"cam{camera}").mkdir()
        feeds.append(CameraFeed(FolderSource(str(tmp_path / f"cam{camera}")),
                                WatchOptions(camera=f"cam{camera}"), generation, stop))
    fill(feeds, photos, 0)
    work = Scheduler(feeds, lanes=1, max_batch=2).take()
    assert [feed.options.camera for feed, _ in work] == ["cam0", "cam1"]
    records, failure = _caption_work(captioner, work)
    assert isinstance(failure, RuntimeError)
    assert [record.camera for record in records] == ["cam0"] and records[0].result.token_ids
