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
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .sources import Frame, FolderSource, VideoSource


@dataclass(frozen=True)
class WatchOptions:
    max_fps: float | None = None  # cap on captions per second (None: as fast as the model goes)
    scene_threshold: float = 0.08  # mean |difference| of 32x32 grayscale in [0, 1]
    heartbeat_s: float | None = None  # caption at least this often even without scene change
    changes_only: bool = False  # emit only when the caption text changes
    realtime: bool | None = None  # None: True for live sources, False for files


@dataclass
class CaptionRecord:
    stream_time: float  # seconds on the source's clock; never goes back across reconnects
    wall_time: str  # ISO 8601 UTC when the caption was ready
    frame_index: int
    caption: str
    latency_ms: float  # frame received -> caption ready
    dropped: int  # frames dropped (stale) since the previous record
    reason: str  # "first", "scene" or "heartbeat"
    source_name: str = ""


class LatestFrame:
    """One-slot mailbox: a new frame replaces an untaken one (counted as dropped)."""

    def __init__(self, lossless: bool):
        self.lossless = lossless
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


def signature(frame: Frame) -> np.ndarray:
    small = frame.image.convert("L").resize((32, 32))
    return np.asarray(small, dtype=np.float32) / 255.0


def watch(source: VideoSource | FolderSource, captioner, options: WatchOptions = WatchOptions(),
          stop: threading.Event | None = None, **generation) -> Iterator[CaptionRecord]:
    """Caption ``source`` lazily: a generator of ``CaptionRecord`` that ends with the source or
    when ``stop`` is set. Generation options (``num_beams``, ...) pass to the captioner."""
    stop = stop or threading.Event()
    realtime = source.live if options.realtime is None else options.realtime
    is_folder = isinstance(source, FolderSource)
    mailbox = LatestFrame(lossless=not realtime or is_folder)
    generation_options = captioner.options(**generation)
    reader_error: list[BaseException] = []

    def read() -> None:
        began = None
        try:
            for frame in source.frames():
                if stop.is_set():
                    break
                if realtime and not source.live:  # pace a file at its own clock
                    began = began if began is not None else time.monotonic() - frame.timestamp
                    delay = began + frame.timestamp - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                mailbox.put(frame, stop)
        except BaseException as exc:  # noqa: BLE001 - surfaced to the consumer
            reader_error.append(exc)
        finally:
            mailbox.close()

    reader = threading.Thread(target=read, name="edgecap-reader", daemon=True)
    reader.start()
    last_signature, last_text = None, None
    last_caption_at, last_caption_stream = -1e9, None  # when the last caption was: wall, stream
    dropped_reported = 0
    if options.max_fps is not None and options.max_fps <= 0:
        raise ValueError(f"max_fps must be > 0 (got {options.max_fps})")
    min_gap_s = 1.0 / options.max_fps if options.max_fps else 0.0
    wait_for_cap = realtime or is_folder  # else: a file read losslessly, capped on its own clock
    try:
        while not stop.is_set():
            if min_gap_s and wait_for_cap:
                # Wait out the cap before taking a frame, so the one taken is the newest: frames
                # that arrive meanwhile replace each other in the mailbox (counted as dropped),
                # and a folder's files simply wait their turn (none is lost). Short slices, so a
                # stop, or a source that ended with nothing left to caption, is noticed at once.
                while not stop.is_set() and not (mailbox.closed and mailbox.frame is None):
                    remaining = last_caption_at + min_gap_s - time.monotonic()
                    if remaining <= 0:
                        break
                    stop.wait(min(remaining, 0.1))
            taken = mailbox.take()
            if taken is None:
                if mailbox.closed and mailbox.frame is None:
                    break
                continue
            frame, received, dropped_so_far = taken
            if min_gap_s and not wait_for_cap and last_caption_stream is not None \
                    and frame.timestamp - last_caption_stream < min_gap_s - 1e-6:
                continue  # a file read losslessly: the cap is on the stream's own clock
            current = signature(frame)
            if last_signature is None:
                reason = "first"
            elif is_folder or float(np.abs(current - last_signature).mean()) > options.scene_threshold:
                reason = "scene"
            elif options.heartbeat_s and frame.timestamp - last_caption_stream >= options.heartbeat_s:
                reason = "heartbeat"
            else:
                continue
            result = captioner.caption_loaded([frame.image], generation_options,
                                              [frame.name or str(frame.index)])[0]
            last_caption_at = time.monotonic()
            last_signature, last_caption_stream = current, frame.timestamp
            if options.changes_only and result.text == last_text:
                continue
            last_text = result.text
            # Frames dropped between the previous captioned frame and this one.
            dropped = dropped_so_far - dropped_reported
            dropped_reported = dropped_so_far
            yield CaptionRecord(
                stream_time=round(frame.timestamp, 4),
                wall_time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                frame_index=frame.index, caption=result.text,
                latency_ms=round((last_caption_at - received) * 1e3, 2), dropped=dropped,
                reason=reason, source_name=frame.name)
    finally:
        stop.set()
        source.stop()
        reader.join(timeout=5)
    if reader_error and not isinstance(reader_error[0], (KeyboardInterrupt, SystemExit)):
        raise reader_error[0]


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


class JsonlWriter:
    def __init__(self, path: Path | None):
        self.handle = open(path, "a", encoding="utf-8") if path else None

    def add(self, record: CaptionRecord) -> None:
        line = json.dumps(asdict(record), ensure_ascii=False)
        if self.handle:
            self.handle.write(line + "\n")
            self.handle.flush()
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.handle:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
