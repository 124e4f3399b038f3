"""``edgecap watch``: timestamped captions for a stream of frames, without falling behind.

Real-time policy: the reader thread keeps only the newest frame (a one-slot mailbox, never a
queue); the captioner takes the newest frame when it is free and stale frames are dropped and
counted. A cheap scene gate (32x32 grayscale mean difference) skips frames that look like the
last captioned one; an optional heartbeat captions anyway every N seconds. Files are read
losslessly by default (every frame passes the gate, so scene cuts are exact); ``realtime=True``
paces a file at its own frame rate and applies the live-source dropping policy.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from ..results import CaptionResult
from .options import WatchOptions
from .sources import Frame, FolderSource, VideoSource


@dataclass
class CaptionRecord:
    """A caption of one frame: the ``CaptionResult`` plus where it sits in the stream."""

    result: CaptionResult
    stream_time: float  # seconds on the source's clock; never goes back across reconnects
    wall_time: str  # ISO 8601 UTC when the caption was ready
    frame_index: int
    latency_ms: float  # frame received -> caption ready
    dropped: int  # frames dropped (stale) since the previous record
    reason: str  # "first", "scene" or "heartbeat"
    camera: str = ""
    image: Image.Image | None = field(default=None, repr=False)  # the frame, for snapshots
    snapshot: str | None = None  # set by the archive writer when it saved the frame

    @property
    def caption(self) -> str:
        return self.result.text

    @property
    def source_name(self) -> str:
        """The frame's file name for folder sources, else the source itself."""
        return self.result.source

    def to_record(self) -> dict[str, Any]:
        """``CaptionResult.to_record()`` extended with the stream fields."""
        record = self.result.to_record()
        record.update(stream_time=self.stream_time, wall_time=self.wall_time,
                      frame_index=self.frame_index, latency_ms=self.latency_ms,
                      dropped=self.dropped, reason=self.reason)
        if self.camera:
            record["camera"] = self.camera
        if self.snapshot:
            record["snapshot"] = self.snapshot
        return record


class LatestFrame:
    """One-slot mailbox: a new frame replaces an untaken one (counted as dropped)."""

    def __init__(self, lossless: bool, ready: threading.Event | None = None):
        self.lossless = lossless
        self.ready = ready  # set on every put and close: wakes a scheduler that waits on many
        self.condition = threading.Condition()
        self.frame: Frame | None = None
        self.received = 0.0
        self.dropped = 0
        self.closed = False

    def put(self, frame: Frame, stop: threading.Event) -> None:
        with self.condition:
            if self.lossless:  # files: wait for the consumer instead of dropping
                while self.frame is not None and not stop.is_set():
                    self.condition.wait(0.05)
            elif self.frame is not None:
                self.dropped += 1
            self.frame, self.received = frame, time.monotonic()
            self.condition.notify_all()
        if self.ready is not None:
            self.ready.set()

    def take(self, timeout: float = 0.1) -> tuple[Frame, float, int] | None:
        """(newest frame, when it arrived, frames dropped so far) or None after ``timeout``."""
        with self.condition:
            if self.frame is None and not self.closed:
                self.condition.wait(timeout)
            if self.frame is None:
                return None
            frame, self.frame = self.frame, None
            self.condition.notify_all()
            return frame, self.received, self.dropped

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()
        if self.ready is not None:
            self.ready.set()

    @property
    def ended(self) -> bool:
        """The source ended and its last frame was taken."""
        return self.closed and self.frame is None


SIGNATURE_SIDE = 32  # the scene gate compares frames at this size


def signature(frame: Frame) -> np.ndarray:
    small = frame.image.convert("L").resize((SIGNATURE_SIDE, SIGNATURE_SIDE))
    return np.asarray(small, dtype=np.float32) / 255.0


def frame_size(captioner) -> tuple[int, int] | None:
    """The size a source may decode frames down towards: what the model and the scene gate
    need (None: full frames, as with ``exact_preprocessing`` or a captioner-like object that
    does not say)."""
    size = getattr(captioner, "decode_size", None)
    return None if size is None else (max(size[0], SIGNATURE_SIDE), max(size[1], SIGNATURE_SIDE))


def watch(source: VideoSource | FolderSource, captioner, options: WatchOptions = WatchOptions(),
          stop: threading.Event | None = None, **generation) -> Iterator[CaptionRecord]:
    """Caption ``source`` lazily: a generator of ``CaptionRecord`` that ends with the source or
    when ``stop`` is set. Generation options (``num_beams``, ...) pass to the captioner.

    Frames are decoded at the size the captioner needs (``frame_size``; the source's own
    ``reduce_to`` is replaced by it).

    Raises:
        OptionsError: bad generation options, at the call, before any thread starts or the
            source is read (``WatchOptions`` checks its own bounds when it is built).
    """
    source.reduce_to = frame_size(captioner)
    feed = CameraFeed(source, options, captioner.options(**generation), stop or threading.Event())
    return _watch_one(feed, captioner)


def _watch_one(feed: CameraFeed, captioner) -> Iterator[CaptionRecord]:
    feed.start()
    try:
        while not feed.stop.is_set():
            feed.wait_for_cap()
            taken = feed.mailbox.take()
            if taken is None:
                if feed.mailbox.ended:
                    break
                continue
            chosen = feed.choose(*taken)
            if chosen is None:
                continue
            yield from caption_chosen(captioner, [chosen])
    finally:
        feed.stop.set()
        feed.close()
    feed.raise_reader_error()


def caption_chosen(captioner, chosen: list[Chosen]) -> Iterator[CaptionRecord]:
    """Caption frames chosen by one or many feeds (``Captioner.caption_grouped``: a batch per
    set of generation options) and turn each caption into its feed's record."""
    for members, outcome in captioner.caption_grouped(chosen):
        if isinstance(outcome, Exception):
            raise outcome
        for picked, result in zip(members, outcome):
            record = picked.feed.finish(picked, result)
            if record is not None:
                yield record


@dataclass
class Chosen:
    """A frame the scene gate chose to caption, with what the caption and record need (a
    ``captioner.Pending``)."""

    feed: CameraFeed
    frame: Frame
    received: float  # monotonic arrival
    dropped_so_far: int
    reason: str
    signature: np.ndarray

    @property
    def image(self) -> Image.Image:
        return self.frame.image

    @property
    def options(self):
        return self.feed.generation_options

    @property
    def source(self) -> str:
        return self.feed.name_of(self.frame)


class CameraFeed:
    """One source: a reader thread keeps its newest frame in a mailbox; ``choose`` applies the
    fps cap and the scene gate; ``finish`` turns a caption into the stream's record."""

    def __init__(self, source, options: WatchOptions, generation_options, stop: threading.Event,
                 ready: threading.Event | None = None):
        self.source, self.options = source, options
        self.generation_options, self.stop = generation_options, stop
        self.realtime = source.live if options.realtime is None else options.realtime
        self.is_folder = isinstance(source, FolderSource)
        self.label = str(getattr(source, "source", getattr(source, "folder", "")))
        self.mailbox = LatestFrame(lossless=not self.realtime or self.is_folder, ready=ready)
        self.reader: threading.Thread | None = None
        self.reader_error: list[BaseException] = []
        self.min_gap_s = 1.0 / options.max_fps if options.max_fps else 0.0
        # Else: a file read losslessly, capped on its own clock.
        self.wait_for_cap_s = self.realtime or self.is_folder
        self.last_signature: np.ndarray | None = None
        self.last_text: str | None = None
        self.last_caption_at = -1e9  # monotonic time of the last caption
        self.last_caption_stream: float | None = None  # its stream time
        self.dropped_reported = 0

    def start(self) -> None:
        self.reader = threading.Thread(target=self._read, name="edgecap-reader", daemon=True)
        self.reader.start()

    def close(self) -> None:
        self.source.stop()
        if self.reader is not None:
            self.reader.join(timeout=5)

    def raise_reader_error(self) -> None:
        error = self.reader_error[0] if self.reader_error else None
        if error is not None and not isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise error

    def name_of(self, frame: Frame) -> str:
        return frame.name if self.is_folder else self.label

    def _read(self) -> None:
        began = None
        try:
            for frame in self.source.frames():
                if self.stop.is_set():
                    break
                if self.realtime and not self.source.live:  # pace a file at its own clock
                    began = began if began is not None else time.monotonic() - frame.timestamp
                    delay = began + frame.timestamp - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                self.mailbox.put(frame, self.stop)
        except BaseException as exc:  # noqa: BLE001 - surfaced to the consumer
            self.reader_error.append(exc)
        finally:
            self.mailbox.close()

    def cap_remaining(self) -> float:
        """Seconds until the fps cap lets this feed caption again (0: now)."""
        if not (self.min_gap_s and self.wait_for_cap_s):
            return 0.0
        return max(0.0, self.last_caption_at + self.min_gap_s - time.monotonic())

    def wait_for_cap(self) -> None:
        """Wait out the fps cap before taking a frame, so the one taken is the newest: frames
        that arrive meanwhile replace each other in the mailbox (counted as dropped), and a
        folder's files simply wait their turn (none is lost). Short slices, so a stop, or a
        source that ended with nothing left to caption, is noticed at once."""
        while not self.stop.is_set() and not self.mailbox.ended:
            remaining = self.cap_remaining()
            if remaining <= 0:
                return
            self.stop.wait(min(remaining, 0.1))

    def _reason(self, frame: Frame, current: np.ndarray) -> str | None:
        """Why this frame is captioned ("first", "scene", "heartbeat"), or None to skip it."""
        if self.min_gap_s and not self.wait_for_cap_s and self.last_caption_stream is not None \
                and frame.timestamp - self.last_caption_stream < self.min_gap_s - 1e-6:
            return None  # a file read losslessly: the cap is on the stream's own clock
        if self.last_signature is None:
            return "first"
        change = float(np.abs(current - self.last_signature).mean())
        if self.is_folder or change > self.options.scene_threshold:
            return "scene"
        heartbeat = self.options.heartbeat_s
        if heartbeat and frame.timestamp - self.last_caption_stream >= heartbeat:
            return "heartbeat"
        return None

    def choose(self, frame: Frame, received: float, dropped_so_far: int) -> Chosen | None:
        """The frame with why it is captioned, or None when the gate skips it."""
        current = signature(frame)
        reason = self._reason(frame, current)
        return None if reason is None else Chosen(self, frame, received, dropped_so_far, reason,
                                                  current)

    def finish(self, chosen: Chosen, result: CaptionResult) -> CaptionRecord | None:
        """The record of a captioned frame (None under changes_only when the text repeats)."""
        self.last_caption_at = time.monotonic()
        self.last_signature, self.last_caption_stream = chosen.signature, chosen.frame.timestamp
        if self.options.changes_only and result.text == self.last_text:
            return None
        self.last_text = result.text
        # Frames dropped between the previous captioned frame and this one.
        dropped = chosen.dropped_so_far - self.dropped_reported
        self.dropped_reported = chosen.dropped_so_far
        return CaptionRecord(
            result, stream_time=round(chosen.frame.timestamp, 4),
            wall_time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            frame_index=chosen.frame.index,
            latency_ms=round((self.last_caption_at - chosen.received) * 1e3, 2),
            dropped=dropped, reason=chosen.reason, camera=self.options.camera,
            image=chosen.frame.image)


# ---------------------------------------------------------------- outputs


def _clock(seconds: float, separator: str) -> str:
    millis = int(round(max(0.0, seconds) * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


class SubtitleWriter:
    """SRT or WebVTT; each cue lasts until the next caption.

    Constant work and memory per caption, however long the stream runs: cues before the newest
    are final and never rewritten. The newest cue is written at once with a provisional end
    (``last_cue_s`` later) and rewritten in place, with its true end, when the next caption
    arrives or the writer closes. The file is valid at every moment (whole cues only); between
    the truncate and the write of one update it briefly lacks the newest cue.
    """

    def __init__(self, path: Path, kind: str, last_cue_s: float = 2.0):
        if kind not in ("srt", "vtt"):
            raise ValueError(f"subtitle kind {kind!r}: choose srt or vtt")
        self.path, self.kind, self.last_cue_s = Path(path), kind, last_cue_s
        self.separator = "," if kind == "srt" else "."
        self.handle = open(self.path, "wb")  # bytes: exact offsets to rewrite the newest cue from
        self.handle.write(b"" if kind == "srt" else b"WEBVTT\n\n")
        self.handle.flush()
        self.final_end = self.handle.tell()  # where the provisional newest cue starts
        self.cues = 0
        self.pending: tuple[float, str] | None = None  # the newest cue: (start, text)

    def add(self, record: CaptionRecord) -> None:
        if self.handle.closed:
            raise ValueError(f"{self.path}: subtitle writer already closed")
        final = b""
        if self.pending is not None:  # the previous cue now ends where this one starts
            final = self._cue(self.cues, *self.pending, end=record.stream_time)
        self.cues += 1
        self.pending = (record.stream_time, _one_line(record.caption))
        start = self.pending[0]
        provisional = self._cue(self.cues, *self.pending, end=start + self.last_cue_s)
        self._rewrite(final, provisional)

    def close(self, stream_end: float | None = None) -> None:
        if self.handle.closed:
            return
        try:
            if self.pending is not None:
                start = self.pending[0]
                end = max(stream_end or 0.0, start + self.last_cue_s)
                self._rewrite(self._cue(self.cues, *self.pending, end=end), b"")
            self.handle.flush()
            os.fsync(self.handle.fileno())
        finally:
            self.handle.close()

    def _cue(self, number: int, start: float, text: str, end: float) -> bytes:
        end = max(end, start + 0.001)  # a cue must end after it starts
        label = f"{number}\n" if self.kind == "srt" else ""
        return (f"{label}{_clock(start, self.separator)} --> {_clock(end, self.separator)}\n"
                f"{text}\n\n").encode("utf-8")

    def _rewrite(self, final: bytes, provisional: bytes) -> None:
        """Replace the provisional cue with ``final`` (kept from now on) + ``provisional``."""
        self.handle.seek(self.final_end)
        self.handle.truncate()
        self.handle.write(final + provisional)
        self.handle.flush()
        self.final_end += len(final)


def _one_line(caption: str) -> str:
    """A cue's text: one line (a blank line would end the cue), never empty (invalid SRT)."""
    return " ".join(caption.split()) or "..."
