"""`edgecap watch --config`: four real looping HTTP streams on 127.0.0.1 through one model.
Every camera gets captions; killing one stream's server leaves the others' rate unchanged, and
the killed one reconnects. Also files through one config, and config errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

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
