"""`edgecap watch` on real videos encoded by the test with PyAV from Flickr8k test-split images."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")

from edgecap import Captioner  # noqa: E402
from edgecap.watch.sources import FolderSource, LiveClock, VideoSource  # noqa: E402
from edgecap.watch.stream import SubtitleWriter, WatchOptions, watch  # noqa: E402

FPS = 10
SCENE_SECONDS = 1.0


def encode_video(path: Path, images: list[Path], fps: int = FPS, seconds: float = SCENE_SECONDS,
                 size=(320, 240)) -> list[float]:
    """One scene per image, each ``seconds`` long, with mild per-frame noise; returns cut times."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        index = 0
        for image_path in images:
            base = np.asarray(Image.open(image_path).convert("RGB").resize(size), np.int16)
            for _ in range(int(seconds * fps)):
                noisy = np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
                frame = av.VideoFrame.from_ndarray(noisy, format="rgb24")
                frame.pts = index
                index += 1
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return [i * seconds for i in range(len(images))]


@pytest.fixture(scope="module")
def scene_video(tmp_path_factory, flickr_test_images) -> tuple[Path, list[float]]:
    path = tmp_path_factory.mktemp("video") / "scenes.mp4"
    return path, encode_video(path, flickr_test_images[:4])


SRT_CUE = re.compile(r"^(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n(.+)$")


def parse_clock(text: str) -> float:
    hours, minutes, rest = text.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(rest)


def check_srt(text: str) -> list[tuple[float, float, str]]:
    cues = []
    for number, block in enumerate(text.strip().split("\n\n"), 1):
        match = SRT_CUE.match(block)
        assert match, f"bad SRT cue: {block!r}"
        assert int(match.group(1)) == number
        cues.append((parse_clock(match.group(2)), parse_clock(match.group(3)), match.group(4)))
    for (start, end, _), following in zip(cues, cues[1:] + [None]):
        assert end > start
        if following:
            assert end == following[0]  # each cue lasts until the next caption
    return cues


def check_vtt(text: str) -> int:
    assert text.startswith("WEBVTT\n\n")
    blocks = text.strip().split("\n\n")[1:]
    for block in blocks:
        timing, caption = block.split("\n", 1)
        assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}", timing) and caption
    return len(blocks)


def test_one_caption_per_scene_at_the_cut(tiny_export, scene_video, tmp_path):
    video, cuts = scene_video
    captioner = Captioner(tiny_export)
    srt = SubtitleWriter(tmp_path / "out.srt", "srt")
    vtt = SubtitleWriter(tmp_path / "out.vtt", "vtt")
    records = []
    for record in watch(VideoSource(str(video)), captioner, WatchOptions()):
        records.append(record)
        srt.add(record)
        vtt.add(record)
    srt.close(stream_end=len(cuts) * SCENE_SECONDS)
    vtt.close(stream_end=len(cuts) * SCENE_SECONDS)
    assert [r.reason for r in records] == ["first"] + ["scene"] * (len(cuts) - 1)
    for record, cut in zip(records, cuts):
        assert abs(record.stream_time - cut) <= 1.0 / FPS + 1e-6
        assert record.dropped == 0  # files are read losslessly by default
    cues = check_srt((tmp_path / "out.srt").read_text())
    assert [c[0] for c in cues] == [r.stream_time for r in records]
    assert check_vtt((tmp_path / "out.vtt").read_text()) == len(records)


def test_live_clock_carries_on_through_a_reconnect():
    clock = LiveClock()
    # The first connection keeps its own clock (MPEG-TS over HTTP starts near 1.4 s).
    first = [clock.place(1.4 + i * 0.1, 100.0 + i * 0.1) for i in range(3)]
    assert first == pytest.approx([1.4, 1.5, 1.6])
    # Reconnected 3 s after the last frame; the new clock restarts at 0 and its first frames,
    # read while the stream was probed, come out 2 s later: they count from the reconnect.
    clock.reconnected(103.2)
    assert clock.place(0.0, 105.2) == pytest.approx(4.6)
    assert clock.place(0.1, 105.2) == pytest.approx(4.7)
    # A clock that jumps back within one connection continues from the arrival gap.
    assert clock.place(0.0, 105.5) == pytest.approx(5.0)
    assert clock.place(0.1, 105.6) == pytest.approx(5.1)
    # Even with no measurable wall-clock gap, time moves forward.
    clock.reconnected(105.6)
    assert clock.place(0.0, 105.6) > 5.1
    # A reconnect before any frame has nothing to continue from: the clock is the stream's.
    fresh = LiveClock()
    fresh.reconnected(0.5)
    assert fresh.place(5.0, 1.0) == 5.0
    # A stream that starts a little below zero (RTSP) is moved up to start at 0.
    early = LiveClock()
    assert [early.place(t, 1.0 + t) for t in (-0.3, -0.2, 0.7)] == pytest.approx([0.0, 0.1, 1.0])


def test_live_source_timeline_continues_when_the_clock_restarts(scene_video):
    """A real file read as if it were live: at its end the source reconnects, and the reopened
    file's clock restarts at 0, like a restarted server's."""
    video, cuts = scene_video
    per_pass = len(cuts) * int(SCENE_SECONDS * FPS)
    source = VideoSource(str(video))
    source.live = True
    frames, wanted = [], per_pass + per_pass // 2  # stop half-way through the second pass
    for frame in source.frames():
        frames.append(frame)
        if len(frames) == wanted:
            source.stop()
    times = [frame.timestamp for frame in frames]
    assert len(times) == wanted and source.stats.reconnects == 1
    assert times[:per_pass] == pytest.approx([i / FPS for i in range(per_pass)])
    # The reconnect waits 0.5 s (the first backoff) before reopening the file.
    assert 0.5 <= times[per_pass] - times[per_pass - 1] < 5.0
    assert np.diff(times[per_pass:]) == pytest.approx(1.0 / FPS)
    assert [frame.index for frame in frames] == list(range(wanted))


def test_heartbeat_adds_captions_within_a_scene(tiny_export, scene_video):
    video, cuts = scene_video
    records = list(watch(VideoSource(str(video)), Captioner(tiny_export),
                         WatchOptions(heartbeat_s=0.45)))
    assert sum(r.reason == "heartbeat" for r in records) >= len(cuts)


class SlowCaptioner(Captioner):
    """The real captioner, slowed down on purpose: the stream outpaces it."""

    def __init__(self, model, delay_s: float):
        super().__init__(model)
        self.delay_s = delay_s

    def caption_loaded(self, *args, **kwargs):
        time.sleep(self.delay_s)
        return super().caption_loaded(*args, **kwargs)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_slow_captioner_drops_frames_and_memory_stays_bounded(tiny_export, tmp_path, flickr_test_images):
    video = tmp_path / "fast.mp4"
    encode_video(video, flickr_test_images[:2], fps=50, seconds=3.0, size=(640, 480))
    slow = SlowCaptioner(tiny_export, delay_s=0.2)
    before = rss_mb()
    records = list(watch(VideoSource(str(video)), slow,
                         WatchOptions(realtime=True, heartbeat_s=0.01)))
    growth = rss_mb() - before
    total_frames = 2 * 3 * 50
    assert len(records) < total_frames / 4
    dropped = sum(r.dropped for r in records)
    assert dropped > total_frames / 2
    for previous, record in zip(records, records[1:]):
        # The captioner always takes the newest frame; every frame in between was dropped.
        assert record.dropped == record.frame_index - previous.frame_index - 1, record
        # A paced 50 fps stream cannot deliver more than latency*50 frames during one caption.
        assert record.dropped <= previous.latency_ms / 1000 * 50 * 1.3 + 2, record
    assert growth < 150, f"RSS grew {growth:.0f} MB"


def test_folder_source_captions_each_new_file_once(tiny_export, tmp_path, flickr_test_images):
    folder = tmp_path / "drop"
    folder.mkdir()
    stop = threading.Event()
    source = FolderSource(str(folder), poll_s=0.05)
    captioner = Captioner(tiny_export)
    records = []

    def feed():
        (folder / "broken.jpg").write_bytes(b"not an image")
        for i, image in enumerate(flickr_test_images[:3]):
            shutil.copy(image, folder / f"{i}.jpg")
            time.sleep(0.2)
        deadline = time.monotonic() + 60
        while len(records) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a chance for any duplicate to show up
        stop.set()

    feeder = threading.Thread(target=feed)
    feeder.start()
    for record in watch(source, captioner, WatchOptions(), stop):
        records.append(record)
    feeder.join()
    assert [r.source_name for r in records] == ["0.jpg", "1.jpg", "2.jpg"]
    assert source.stats.corrupt == 1  # broken.jpg: skipped and counted, never captioned


def test_sigint_flushes_valid_subtitles(tiny_export, tmp_path, flickr_test_images):
    video = tmp_path / "long.mp4"
    encode_video(video, flickr_test_images[:6], seconds=2.0)
    out, srt, vtt = tmp_path / "c.jsonl", tmp_path / "c.srt", tmp_path / "c.vtt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecap.cli", "watch", str(video), "--model", str(tiny_export),
         "--realtime", "--out", str(out), "--srt", str(srt), "--vtt", str(vtt)],
        stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert 2 <= len(lines) < 6
    assert len(check_srt(srt.read_text())) == len(lines)
    assert check_vtt(vtt.read_text()) == len(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Watcher:
    """``edgecap watch URL`` in a subprocess: JSON lines to one file, its log to another (a log
    file, not a pipe: a pipe nobody reads would block the watcher once it fills up)."""

    def __init__(self, url: str, model: Path, folder: Path):
        self.out, self.log = folder / "live.jsonl", folder / "watch.log"
        self.srt, self.vtt = folder / "live.srt", folder / "live.vtt"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgecap.cli", "watch", url, "--model", str(model),
                 "--out", str(self.out), "--srt", str(self.srt), "--vtt", str(self.vtt),
                 "--timeout-s", "2"], stderr=log)

    def lines(self) -> int:
        return self.out.read_text().count("\n") if self.out.exists() else 0

    def wait_for(self, count: int, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.lines() >= count:
                return True
            time.sleep(0.1)
        return self.lines() >= count

    def stop(self) -> int:
        """SIGTERM (the watcher flushes and exits 0); SIGKILL if it does not within 30 s."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -signal.SIGKILL


def start_server(command: list[str], log: Path) -> subprocess.Popen:
    # Its own process group, so killing the server also kills whatever it started.
    with open(log, "a") as handle:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle,
                                start_new_session=True)


def kill_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=10)


DOWNTIME_S = 2.0  # how long the test server stays dead before it is restarted


def check_captions_resume_after_server_restart(url: str, server_command: list[str],
                                               model: Path, folder: Path) -> None:
    """Captions from a live server; the server is killed and restarted; the same watcher
    process reconnects and captions again, on one timeline that never goes backwards (the new
    connection's clock restarts), so its SRT and WebVTT cues stay valid."""
    server_log = folder / "server.log"
    server = start_server(server_command, server_log)
    started = time.monotonic()
    watcher = Watcher(url, model, folder)

    def logs() -> str:
        return f"\nwatcher:\n{watcher.log.read_text()}\nserver:\n{server_log.read_text()}"

    try:
        assert watcher.wait_for(3, 60), f"no captions from {url}{logs()}"
        kill_server(server)
        time.sleep(DOWNTIME_S)  # long enough for the watcher to notice and start backing off
        before = watcher.lines()
        server = start_server(server_command, server_log)
        assert watcher.wait_for(before + 3, 60), \
            f"captions did not resume after the server restart{logs()}"
        assert watcher.process.poll() is None  # resumed in the same process, not a new one
    finally:
        try:
            kill_server(server)
        finally:
            returncode = watcher.stop()
    elapsed = time.monotonic() - started
    log = watcher.log.read_text()
    assert returncode == 0, log
    reconnects = re.search(r"(\d+) reconnects", log)  # the watcher's closing summary line
    assert "reconnecting" in log and reconnects and int(reconnects.group(1)) >= 1, log
    records = [json.loads(line) for line in watcher.out.read_text().splitlines()]
    assert len(records) >= before + 3
    indices = [record["frame_index"] for record in records]
    assert indices == sorted(set(indices))  # one reader counted frames across the reconnect
    assert all(isinstance(record["generated_text"], str) for record in records)
    times = [record["stream_time"] for record in records]
    assert all(a < b for a, b in zip(times, times[1:])), f"stream_time went backwards: {times}"
    # Records up to `before` came from the first connection, the rest from the second. The
    # timeline carries on through the outage at wall-clock pace: the gap covers the downtime,
    # and the whole span is no longer than the servers and the watcher ran (1 s of slack: where
    # a connection's clock starts against the wall clock is up to the server).
    assert times[before] - times[before - 1] >= DOWNTIME_S, times
    assert times[-1] - times[0] <= elapsed + 1.0, (times, elapsed)
    cues = check_srt(watcher.srt.read_text())
    assert len(cues) == len(records)
    assert all(abs(cue[0] - t) <= 0.0015 for cue, t in zip(cues, times)), (cues, times)
    assert check_vtt(watcher.vtt.read_text()) == len(records)


needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None,
                                  reason="ffmpeg (Debian package) not installed")


@needs_ffmpeg
def test_http_stream_reconnects_after_server_restart(tiny_export, scene_video, tmp_path):
    video, _ = scene_video
    url = f"http://127.0.0.1:{free_port()}/live.ts"
    server = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1",
              "-i", str(video), "-c:v", "mpeg2video", "-q:v", "4", "-f", "mpegts",
              "-listen", "1", url]
    check_captions_resume_after_server_restart(url, server, tiny_export, tmp_path)


@needs_ffmpeg
def test_rtsp_stream_reconnects_after_server_restart(tiny_export, scene_video, tmp_path):
    video, _ = scene_video
    port = free_port()
    # ffmpeg publishes the video into a small RTSP relay, which serves it to the watcher.
    server = [sys.executable, str(Path(__file__).with_name("rtsp_relay.py")),
              "--port", str(port), "--video", str(video)]
    url = f"rtsp://127.0.0.1:{port}/live"
    check_captions_resume_after_server_restart(url, server, tiny_export, tmp_path)


# ---------------------------------------------------------------- options, outputs and faults


def test_subtitles_stay_valid_and_end_with_the_newest_caption(tmp_path):
    from edgecap import CaptionResult
    from edgecap.watch.stream import CaptionRecord

    def record(t: float, text: str) -> CaptionRecord:
        return CaptionRecord(CaptionResult(text, [], 0.0), t, "", 0, 1.0, 0, "scene")

    texts = ["a dog runs", "", "two lines\n\nof text", "a café"]
    srt_path, vtt_path = tmp_path / "live.srt", tmp_path / "live.vtt"
    srt, vtt = SubtitleWriter(srt_path, "srt"), SubtitleWriter(vtt_path, "vtt")
    for number, text in enumerate(texts, 1):
        srt.add(record(number * 1.5, text))
        vtt.add(record(number * 1.5, text))
        # Readable at any moment: whole cues only, the newest one already there with a
        # provisional end two seconds after its start.
        cues = check_srt(srt_path.read_text(encoding="utf-8"))
        assert len(cues) == number and check_vtt(vtt_path.read_text(encoding="utf-8")) == number
        assert cues[-1][:2] == (number * 1.5, number * 1.5 + 2.0)
    srt.close(stream_end=10.0)
    vtt.close(stream_end=10.0)
    cues = check_srt(srt_path.read_text(encoding="utf-8"))
    assert [c[2] for c in cues] == ["a dog runs", "...", "two lines of text", "a café"]
    assert cues[-1][1] == 10.0  # the last cue runs to the end of the stream
    assert check_vtt(vtt_path.read_text(encoding="utf-8")) == len(texts)


def captions_of(video: Path, export: Path, **options) -> list:
    return list(watch(VideoSource(str(video)), Captioner(export), WatchOptions(**options)))


def test_changes_only_emits_when_the_text_changes(tiny_export, scene_video):
    video, _ = scene_video
    every = captions_of(video, tiny_export, heartbeat_s=0.2)
    changes = captions_of(video, tiny_export, heartbeat_s=0.2, changes_only=True)
    expected = [r for i, r in enumerate(every) if i == 0 or r.caption != every[i - 1].caption]
    assert len(expected) < len(every), "no repeated caption: the test would prove nothing"
    assert [(r.frame_index, r.caption) for r in changes] == [(r.frame_index, r.caption) for r in expected]


def test_fps_caps_captions_on_the_video_clock(tiny_export, scene_video):
    video, cuts = scene_video
    records = captions_of(video, tiny_export, heartbeat_s=0.1, max_fps=0.4)
    times = [r.stream_time for r in records]
    assert len(times) >= 2 and times[0] == 0.0
    assert all(later - earlier >= 2.5 - 1e-6 for earlier, later in zip(times, times[1:]))


def test_fps_caps_a_live_stream(tiny_export, tmp_path, flickr_test_images):
    video = tmp_path / "live.mp4"
    encode_video(video, flickr_test_images[:2], fps=25, seconds=2.0)
    records = captions_of(video, tiny_export, realtime=True, heartbeat_s=0.01, max_fps=2.0)
    assert 2 <= len(records) <= 2 * 4 + 1  # 4 s of video at no more than 2 captions a second
    assert sum(r.dropped for r in records) > 0  # frames that came in while the cap held are dropped
    # The cap is on the wall clock (a late reader can hand over frames closer in stream time).
    ready = [datetime.datetime.fromisoformat(r.wall_time).timestamp() for r in records]
    assert all(later - earlier >= 0.5 - 0.002 for earlier, later in zip(ready, ready[1:]))


@pytest.mark.parametrize("realtime", [None, False])  # False: --lossless
def test_fps_cap_skips_no_file_of_a_folder(tiny_export, tmp_path, flickr_test_images, realtime):
    folder = tmp_path / "drop"
    folder.mkdir()
    for i, image in enumerate(flickr_test_images[:3]):
        shutil.copy(image, folder / f"{i}.jpg")
    source, stop = FolderSource(str(folder), poll_s=0.05), threading.Event()
    records = []
    options = WatchOptions(max_fps=4.0, realtime=realtime)
    for record in watch(source, Captioner(tiny_export), options, stop):
        records.append((time.monotonic(), record.source_name))
        if len(records) == 3:
            stop.set()
    assert sorted(name for _, name in records) == ["0.jpg", "1.jpg", "2.jpg"]
    assert all(b[0] - a[0] >= 0.25 - 0.02 for a, b in zip(records, records[1:]))


def test_damaged_stream_is_counted_and_captioning_goes_on(tiny_export, tmp_path, flickr_test_images):
    video = tmp_path / "scenes.ts"  # MPEG-TS: packets carry continuity counters the demuxer checks
    with av.open(str(video), "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for index in range(4 * FPS):
            image = Image.open(flickr_test_images[index // FPS]).convert("RGB").resize((320, 240))
            frame = av.VideoFrame.from_image(image)
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = bytearray(video.read_bytes())
    garbage = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    for start in (len(data) // 3, len(data) // 2):
        data[start:start + len(garbage)] = garbage
    video.write_bytes(bytes(data))
    source = VideoSource(str(video))
    records = list(watch(source, Captioner(tiny_export), WatchOptions()))
    assert source.stats.damaged_packets + source.stats.corrupt > 0
    assert records[0].reason == "first"
    assert any(r.stream_time >= 3.0 for r in records), "the last scene was not captioned"


def test_reconnect_backoff_doubles_up_to_its_cap(caplog):
    port = free_port()  # nothing listens there: every connection is refused at once
    source = VideoSource(f"http://127.0.0.1:{port}/stream", timeout_s=1.0, min_backoff_s=0.05,
                         max_backoff_s=0.2, max_reconnects=4)
    caplog.set_level("WARNING", logger="edgecap.watch")
    from edgecap.watch.sources import SourceError

    with pytest.raises(SourceError, match="gave up after 4 reconnects in a row"):
        list(source.frames())
    waits = [float(m) for m in re.findall(r"retry in ([\d.]+) s", caplog.text)]
    assert waits == [0.05, 0.1, 0.2, 0.2]


def test_stalled_stream_times_out_instead_of_hanging():
    """A server that accepts the connection and then sends nothing."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []
    accepting = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not accepting.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    from edgecap.watch.sources import SourceError

    url = f"http://127.0.0.1:{listener.getsockname()[1]}/stream"
    source = VideoSource(url, timeout_s=0.5, min_backoff_s=0.05, max_reconnects=1)
    started = time.monotonic()
    try:
        with pytest.raises(SourceError, match="gave up"):
            list(source.frames())
    finally:
        accepting.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()
    assert len(held) >= 2  # it connected, timed out, and connected again
    assert time.monotonic() - started < 15


def test_a_stream_that_recovers_each_time_is_never_given_up(scene_video):
    """max_reconnects counts failures in a row: a file read as a live stream ends (a lost
    connection) after every pass, and each reopening delivers frames again."""
    video, cuts = scene_video
    per_pass = len(cuts) * int(SCENE_SECONDS * FPS)
    source = VideoSource(str(video), min_backoff_s=0.01, max_reconnects=1)
    source.live = True
    count, wanted = 0, 2 * per_pass + per_pass // 2  # stop half-way through the third pass
    for _ in source.frames():
        count += 1
        if count == wanted:
            source.stop()
    assert count == wanted and source.stats.reconnects == 2
