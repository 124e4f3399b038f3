"""``watch --config``: many cameras, one model, one inference thread.

Each camera has its own reader thread and one-slot mailbox (``CameraFeed``), so a stalled or
reconnecting camera never holds up the others. The scheduler runs in rounds: starting from a
camera that rotates each round, it takes the newest frame of every camera that has one (and
whose fps cap allows it), passes it through that camera's scene gate, and captions the chosen
frames of the round together in one batch. Captions do not depend on their batch, so batching
across cameras changes no caption, only the throughput.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterator

from ..options import DEFAULT_BATCH_SIZE
from .stream import CameraFeed, CaptionRecord, Chosen, caption_chosen

log = logging.getLogger("edgecap.watch")


def watch_cameras(feeds: list[CameraFeed], captioner, stop: threading.Event,
                  ready: threading.Event, max_batch: int = DEFAULT_BATCH_SIZE
                  ) -> Iterator[CaptionRecord]:
    """Caption every feed until all have ended or ``stop`` is set.

    Args:
        feeds: one per camera, built with the same ``stop`` and ``ready`` events.
        captioner: the one ``Captioner`` all cameras share.
        stop: set to end the run (SIGINT/SIGTERM); every feed's source is stopped then.
        ready: set by any feed when a frame arrives or a source ends.
        max_batch: most frames captioned together in one round.
    """
    for feed in feeds:
        feed.start()
    turn = 0
    try:
        while not stop.is_set() and not all(feed.mailbox.ended for feed in feeds):
            ready.clear()  # before looking: a frame that lands meanwhile sets it again
            chosen = _take_round(feeds, turn, max_batch)
            turn = (turn + 1) % len(feeds)
            if not chosen:
                ready.wait(_idle_wait(feeds))
                continue
            yield from caption_chosen(captioner, chosen)
    finally:
        stop.set()
        for feed in feeds:
            feed.close()
    for feed in feeds:  # a camera's failure is reported, and never ended the others' run
        if feed.reader_error:
            log.error("camera %s: %s", feed.options.camera, feed.reader_error[0])


def _take_round(feeds: list[CameraFeed], turn: int, max_batch: int) -> list[Chosen]:
    """Up to ``max_batch`` gated frames, one per camera, fairly: the first camera rotates."""
    chosen = []
    for feed in feeds[turn:] + feeds[:turn]:
        if len(chosen) >= max_batch:
            break
        if feed.cap_remaining() > 0:
            continue
        taken = feed.mailbox.take(timeout=0)
        picked = feed.choose(*taken) if taken is not None else None
        if picked is not None:
            chosen.append(picked)
    return chosen


def _idle_wait(feeds: list[CameraFeed]) -> float:
    """How long to sleep when no camera had a frame: until the nearest fps cap opens, at most a
    short slice (a new frame wakes the scheduler at once through ``ready``)."""
    caps = [feed.cap_remaining() for feed in feeds if feed.cap_remaining() > 0]
    return min([0.1, *caps])
