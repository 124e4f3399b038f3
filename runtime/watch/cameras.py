"""``watch --config``: many cameras, one model, one or more inference lanes.

Each camera has its own reader thread and one-slot mailbox (``CameraFeed``), so a stalled or
reconnecting camera never holds up the others. Lanes (threads, see lanes.py) share one
``Captioner``. A free lane asks the ``Scheduler`` for work: walking the cameras round-robin from
where the previous take stopped, it takes the newest frame of each camera that has one, is not
being captioned by another lane and whose fps cap allows it, passes it through that camera's
scene gate, and stops at the lane's share of the cameras (the cameras divided by the lanes). The
lane captions those frames as one batch. A camera is in at most one lane at a time, so its
records keep their order and its scene gate compares with the frame captioned just before, as
with one lane. Captions depend on neither their batch nor their lane, so lanes change no
caption, only the throughput.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Iterator

from ..options import DEFAULT_BATCH_SIZE
from .lanes import LaneStats
from .stream import CameraFeed, CaptionRecord, Chosen, caption_chosen

log = logging.getLogger("edgecap.watch")

Work = list[tuple[CameraFeed, Chosen]]


def watch_cameras(feeds: list[CameraFeed], captioner, stop: threading.Event,
                  ready: threading.Event, max_batch: int = DEFAULT_BATCH_SIZE, lanes: int = 1,
                  stats: LaneStats | None = None) -> Iterator[CaptionRecord]:
    """Caption every feed until all have ended or ``stop`` is set.

    Records come out of this generator, on the caller's thread, as the lanes finish them; after
    ``stop`` the lanes finish the batches they hold and every record of those comes out before
    the generator ends, so an interrupted run loses no caption it made.

    Args:
        feeds: one per camera, built with the same ``stop`` and ``ready`` events.
        captioner: the one ``Captioner`` all cameras and lanes share.
        stop: set to end the run (SIGINT/SIGTERM); every feed's source is stopped then.
        ready: set by any feed when a frame arrives or a source ends.
        max_batch: most frames one lane captions together.
        lanes: callers captioning at once (threads of this process).
        stats: per-lane counts, for metrics and the summary (None: not kept).
    Raises:
        The first error a lane hit while captioning, after the other lanes' records.
    """
    scheduler = Scheduler(feeds, lanes, max_batch)
    # Bounded, so a consumer that falls behind holds the lanes back instead of piling up frames.
    out: queue.Queue[CaptionRecord] = queue.Queue(maxsize=max(1, lanes) * max_batch)
    left, errors = threading.Event(), []  # left: the consumer stopped reading early
    workers = [threading.Thread(target=_lane, name=f"edgecap-lane-{index}", daemon=True,
                                args=(index, scheduler, captioner, out, stop, ready, left,
                                      stats, errors))
               for index in range(max(1, lanes))]
    for feed in feeds:
        feed.start()
    for worker in workers:
        worker.start()
    try:
        yield from _drain(out, workers)
    finally:
        stop.set()
        left.set()
        for worker in workers:
            worker.join()
        for feed in feeds:
            feed.close()
    for feed in feeds:  # a camera's failure is reported, and never ended the others' run
        if feed.reader_error:
            log.error("camera %s: %s", feed.options.camera, feed.reader_error[0])
    if errors:
        raise errors[0]


def _drain(out: queue.Queue, workers: list[threading.Thread]) -> Iterator[CaptionRecord]:
    """Every record the lanes put out, until all lanes have ended and none is left."""
    while True:
        try:
            yield out.get(timeout=0.1)
        except queue.Empty:
            # A lane puts its last record before it ends: once all have ended, empty is final.
            if not any(worker.is_alive() for worker in workers) and out.empty():
                return


def _lane(index: int, scheduler: Scheduler, captioner, out: queue.Queue, stop: threading.Event,
          ready: threading.Event, left: threading.Event, stats: LaneStats | None,
          errors: list) -> None:
    """One lane: take a share of the cameras' frames, caption them, hand the records out."""
    try:
        while not stop.is_set():
            ready.clear()  # before looking: a frame that lands meanwhile sets it again
            work = scheduler.take()
            if not work:
                if scheduler.ended():
                    return
                ready.wait(scheduler.idle_wait())
                continue
            ready.set()  # frames may be left that this lane's share did not cover: wake the rest
            began = time.perf_counter()
            try:
                records, failure = _caption_work(captioner, work)
                if stats is not None:
                    stats.add(index, len(work), time.perf_counter() - began)
                # The cameras stay this lane's until their records are out, so another lane's
                # next caption of the same camera can never be handed out before them.
                if not _hand_out(records, out, left):
                    return
                if failure is not None:
                    raise failure
            finally:
                scheduler.release(work)
    except BaseException as exc:  # noqa: BLE001 - re-raised on the consumer's thread
        errors.append(exc)
        stop.set()


def _caption_work(captioner, work: Work) -> tuple[list[CaptionRecord], Exception | None]:
    """The records of the work's captions, and the error of a group that failed: the groups
    captioned before it moved their cameras on, so their records must still go out."""
    records: list[CaptionRecord] = []
    try:
        for record in caption_chosen(captioner, [picked for _, picked in work]):
            records.append(record)
    except Exception as exc:  # noqa: BLE001 - raised by the lane once the records are out
        return records, exc
    return records, None


def _hand_out(records: list[CaptionRecord], out: queue.Queue, left: threading.Event) -> bool:
    """Put every record out, waiting for room; False if the consumer left meanwhile."""
    for record in records:
        while True:
            try:
                out.put(record, timeout=0.1)
                break
            except queue.Full:
                if left.is_set():  # nobody reads any more: stop instead of waiting
                    return False
    return True


class Scheduler:
    """Hands the cameras' frames to the lanes, round-robin, each camera to one lane at a time.

    Fairness: each take starts at the camera after the last one the previous take got, and a
    lane takes at most its share, so every camera with a fresh frame is reached within a round of
    takes and none starves. The share is the cameras divided by the lanes, rounded down (at most
    ``max_batch``): then a free lane always finds a full share of free cameras, batches are the
    same size, and a lane that happens to finish sooner serves the cameras in turn rather than
    one smaller batch of the same cameras over and over.
    """

    def __init__(self, feeds: list[CameraFeed], lanes: int, max_batch: int):
        self.feeds = feeds
        self.share = max(1, min(max_batch, len(feeds) // max(1, lanes)))
        self.lock = threading.Lock()
        self.busy: set[int] = set()  # indexes of the cameras a lane is captioning
        self.turn = 0  # the camera the next take starts from

    def take(self) -> Work:
        """Up to ``share`` gated frames, one per free camera, starting at ``turn``."""
        chosen: Work = []
        with self.lock:
            count, start = len(self.feeds), self.turn
            for step in range(count):
                index = (start + step) % count
                feed = self.feeds[index]
                if index in self.busy or feed.cap_remaining() > 0:
                    continue
                taken = feed.mailbox.take(timeout=0)
                picked = feed.choose(*taken) if taken is not None else None
                if picked is not None:
                    chosen.append((feed, picked))
                    self.busy.add(index)
                    self.turn = (index + 1) % count
                    if len(chosen) >= self.share:
                        break
        return chosen

    def release(self, work: Work) -> None:
        """The lane is done with these cameras: they may be taken again."""
        with self.lock:
            for feed, _ in work:
                self.busy.discard(self.feeds.index(feed))

    def ended(self) -> bool:
        """Every source ended and its last frame was taken."""
        return all(feed.mailbox.ended for feed in self.feeds)

    def idle_wait(self) -> float:
        """How long a lane sleeps when it found no frame: until the nearest fps cap opens, at
        most a short slice (a new frame wakes it at once through ``ready``)."""
        caps = [feed.cap_remaining() for feed in self.feeds if feed.cap_remaining() > 0]
        return min([0.1, *caps])
