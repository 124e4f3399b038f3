"""Frame sources for ``edgecap watch``: video files, network streams, cameras and drop folders.

Video goes through PyAV (extra ``[video]``). Live sources reconnect with exponential backoff
after a read timeout or a lost connection; frames that fail to decode or come out flagged
corrupt are skipped and counted; packets the demuxer flags as damaged are counted and still
decoded (the decoder conceals the damage). A live source's frame times stay on one timeline
across reconnects (see ``LiveClock``).

With ``reduce_to`` (``watch`` sets it from the captioner: the model's input, at least the scene
gate's), a frame at least twice that size on both sides is scaled down by a whole factor in the
decoder's own pixel-format conversion, so full-size RGB frames are never made; folder images
take the JPEG rule of ``load_image``. Smaller frames, and all with ``reduce_to=None``, are
exact.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..errors import EdgecapError, ImageError
from ..preprocess import IMAGE_SUFFIXES, load_image, reduction

log = logging.getLogger("edgecap.watch")


class SourceError(EdgecapError):
    """A source that cannot be opened at all (bad path, unsupported URL, no PyAV)."""


@dataclass
class Frame:
    image: Image.Image
    timestamp: float  # stream seconds, one timeline across reconnects (folders: since start)
    index: int  # frame number as decoded (counts every decoded frame, captioned or not)
    name: str = ""  # file name for folder sources


@dataclass
class SourceStats:
    corrupt: int = 0  # frames that failed to decode or came out flagged corrupt: skipped
    damaged_packets: int = 0  # packets the demuxer flagged (checksum, continuity): decoded anyway
    read_errors: int = 0  # files that failed part way through (the frames before were kept)
    reconnects: int = 0


def is_live(source: str) -> bool:
    return source.startswith(("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://")) \
        or source.startswith("/dev/video")


class LiveClock:
    """One timeline for a live source across reconnects: frame times never go backwards.

    Each new connection restarts the stream's own clock (RTSP from about 0, MPEG-TS over HTTP
    from wherever the server's muxer starts). The first connection keeps its clock, moved
    forward only if it starts below zero (RTSP's first frames can be a fraction of a second
    early, and subtitle times cannot be negative). After that, the first frame of a new
    connection is placed at the previous frame's time plus the wall-clock time from that frame's
    arrival to the start of the new connection, so the timeline keeps pace with real time
    through the outage and subtitle cues stay in order. (The new connection's start, not its
    first frame's arrival: opening a stream probes it first, and the frames read while probing,
    about 2 s of them on an MPEG-TS stream, come out in one burst afterwards.) A clock that
    jumps backwards within one connection (an encoder restarted behind a relay, an MPEG-TS
    timestamp wrap) is rebased by the time between the two frames' arrivals.
    """

    MIN_STEP_S = 0.001  # the smallest gap a rebase leaves: one subtitle millisecond

    def __init__(self) -> None:
        self.offset = 0.0  # added to the current connection's own seconds
        self.last: tuple[float, float] | None = None  # (timeline seconds, monotonic arrival)
        self.connected_at: float | None = None  # set by a reconnect, until its first frame

    def reconnected(self, at: float) -> None:
        """A new connection, with a clock of its own, was opened at ``at`` (monotonic)."""
        self.connected_at = at if self.last is not None else None

    def place(self, seconds: float, arrived: float) -> float:
        """Timeline seconds for a frame at ``seconds`` on its connection's clock that arrived at
        ``arrived`` (``time.monotonic()``)."""
        if self.last is None:
            self.offset = max(0.0, -seconds)
        else:
            last_seconds, last_arrived = self.last
            if self.connected_at is not None:
                gap = self.connected_at - last_arrived
            elif seconds + self.offset < last_seconds:
                gap = arrived - last_arrived
            else:
                gap = None
            if gap is not None:
                self.offset = last_seconds + max(gap, self.MIN_STEP_S) - seconds
        self.connected_at = None
        placed = seconds + self.offset
        self.last = (placed, arrived)
        return placed


class VideoSource:
    """Decode frames with PyAV. Live sources retry with backoff; files end at their end.

    Frame timestamps are the stream's presentation times in seconds. Files keep their own clock
    unchanged. Live sources put every connection on one timeline (``LiveClock``): after a
    reconnect, times continue from the last frame before the drop plus the wall-clock time from
    its arrival to the reconnect, instead of restarting from the new connection's clock; a live
    clock that starts below zero is moved to start at 0.
    """

    def __init__(self, source: str, *, timeout_s: float = 5.0, min_backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, max_reconnects: int | None = None,
                 reduce_to: tuple[int, int] | None = None):
        try:
            import av  # noqa: F401
        except ImportError:
            raise SourceError("video sources need PyAV: pip install 'edgecap[video]'") from None
        self.source = source
        self.live = is_live(source)
        self.timeout_s = timeout_s
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_reconnects = max_reconnects  # in a row: a connection that delivers frames resets it
        self.failed_in_row = 0
        self.stats = SourceStats()
        self.stopped = False
        self.reduce_to = reduce_to  # (width, height) frames may be scaled down towards
        if not self.live and not Path(source).is_file():
            raise SourceError(f"{source}: no such video file")

    def _open(self):
        import av

        options = {}
        micros = str(int(self.timeout_s * 1e6))
        if self.source.startswith("rtsp://"):
            options = {"rtsp_transport": "tcp", "timeout": micros}
        elif self.live and "://" in self.source:
            # FFmpeg's own per-read timeout: a stalled stream errors out instead of blocking.
            # (PyAV's timeout= interrupts long but healthy reads of paced streams.)
            options = {"rw_timeout": micros}
        if self.source.startswith("/dev/video"):
            # A camera has no FFmpeg read timeout of its own: PyAV's interrupt (open, read)
            # turns an unplugged or frozen camera into an error, hence a reconnect. Frames come
            # every few tens of ms, so a healthy camera never waits that long.
            return av.open(self.source, format="v4l2", timeout=(self.timeout_s, self.timeout_s))
        return av.open(self.source, options=options)

    def frames(self) -> Iterator[Frame]:
        import av

        backoff, index = self.min_backoff_s, 0
        clock = LiveClock()
        while not self.stopped:
            opening = time.monotonic()
            try:
                container = self._open()
            except (av.FFmpegError, OSError) as exc:
                if not self.live:
                    raise SourceError(f"{self.source}: cannot open video ({exc})") from None
                backoff = self._wait_before_retry(f"cannot open ({exc})", backoff)
                continue
            clock.reconnected(opening)
            decoded_here = 0  # frames from this connection: the clock when a frame has no pts
            try:
                if not container.streams.video:
                    raise SourceError(f"{self.source}: no video stream in this source")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for packet in container.demux(stream):
                    if self.stopped:
                        return
                    for frame in self._decode(packet):
                        if decoded_here == 0:
                            # Reset only once frames flow: a server that accepts and then fails
                            # at once must still be retried ever more slowly (and given up on).
                            backoff, self.failed_in_row = self.min_backoff_s, 0
                        decoded_here += 1
                        seconds = float(frame.pts * stream.time_base) if frame.pts is not None \
                            else self._untimed_seconds(stream, decoded_here - 1)
                        if self.live:
                            seconds = clock.place(seconds, time.monotonic())
                        try:
                            image = frame_image(frame, self.reduce_to)
                        except (av.FFmpegError, ValueError):
                            self.stats.corrupt += 1
                            continue
                        yield Frame(image, seconds, index)
                        index += 1
                if not self.live:
                    return
                log.warning("%s: stream ended; reconnecting", self.source)
            except (av.FFmpegError, OSError) as exc:
                if not self.live:
                    # A file damaged past this point (truncated, garbage): keep what was read.
                    self.stats.read_errors += 1
                    log.warning("%s: read failed after %d frames (%s); stopping there",
                                self.source, decoded_here, exc)
                    return
                log.warning("%s: read failed (%s); reconnecting", self.source, exc)
            finally:
                container.close()
            backoff = self._wait_before_retry("disconnected", backoff)

    def _decode(self, packet) -> list:
        """Frames from one packet, without the ones that fail to decode or come out flagged
        corrupt (counted). Damaged packets are still decoded: the decoder conceals what it can
        and the frames after them stay usable."""
        import av

        if packet.is_corrupt:
            self.stats.damaged_packets += 1
        try:
            frames = packet.decode()
        except av.FFmpegError:
            self.stats.corrupt += 1
            return []
        good = [frame for frame in frames if not frame.is_corrupt]
        self.stats.corrupt += len(frames) - len(good)
        return good

    @staticmethod
    def _untimed_seconds(stream, position: int) -> float:
        """A frame with no timestamp: place it by the stream's nominal rate (25 fps if unknown)."""
        rate = stream.average_rate or stream.guessed_rate
        return position / float(rate) if rate else position / 25.0

    def _wait_before_retry(self, why: str, backoff: float) -> float:
        self.stats.reconnects += 1
        self.failed_in_row += 1
        if self.max_reconnects is not None and self.failed_in_row > self.max_reconnects:
            raise SourceError(f"{self.source}: gave up after {self.max_reconnects} reconnects in a "
                              f"row without a frame ({why})")
        log.warning("%s: %s; retry in %.2f s", self.source, why, backoff)
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and not self.stopped:
            time.sleep(0.05)
        return min(backoff * 2, self.max_backoff_s)

    def stop(self) -> None:
        self.stopped = True


class FolderSource:
    """Caption each image file that appears in a folder, once, in arrival (mtime, name) order."""

    def __init__(self, folder: str, *, poll_s: float = 0.25, existing: bool = True,
                 reduce_to: tuple[int, int] | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"{folder}: not a folder")
        self.poll_s = poll_s
        self.stats = SourceStats()
        self.stopped = False
        self.seen: set[str] = set() if existing else {p.name for p in self.folder.iterdir()}
        self.live = True
        self.reduce_to = reduce_to  # as for load_image

    def frames(self) -> Iterator[Frame]:
        index, started = 0, time.monotonic()
        sizes: dict[str, int] = {}
        while not self.stopped:
            fresh = sorted(self._new_files(), key=lambda item: (item[1].st_mtime, item[0].name))
            for path, status in fresh:
                size = status.st_size
                if sizes.get(path.name) != size:  # still being written: look again next poll
                    sizes[path.name] = size
                    continue
                self.seen.add(path.name)
                try:
                    image = load_image(path, reduce_to=self.reduce_to)
                except ImageError as exc:
                    self.stats.corrupt += 1
                    log.warning("%s", exc)
                    continue
                yield Frame(image, time.monotonic() - started, index, path.name)
                index += 1
            time.sleep(self.poll_s)

    def _new_files(self) -> list[tuple[Path, os.stat_result]]:
        """Unseen image files with their status; a file removed while listing is skipped."""
        found = []
        for path in self.folder.iterdir():
            if path.name in self.seen or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                status = path.stat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(status.st_mode):
                found.append((path, status))
        return found

    def stop(self) -> None:
        self.stopped = True


def frame_image(frame, reduce_to: tuple[int, int] | None) -> Image.Image:
    """A decoded video frame as an RGB PIL image: exact, or scaled down by ``reduction``'s
    factor in the same swscale pass that converts it to RGB (area averaging: each output pixel
    is the mean of its block, as a downscale should be)."""
    factor = reduction((frame.width, frame.height), reduce_to)
    if factor == 1:
        return frame.to_image()
    return frame.to_image(width=frame.width // factor, height=frame.height // factor,
                          interpolation="AREA")


def open_source(source: str, *, reduce_to: tuple[int, int] | None = None,
                **options) -> VideoSource | FolderSource:
    """A folder or a video source; ``reduce_to``: the size frames may be decoded down towards
    (None: full size); ``options``: VideoSource's."""
    if Path(source).is_dir():
        return FolderSource(source, reduce_to=reduce_to)
    return VideoSource(source, reduce_to=reduce_to, **options)
