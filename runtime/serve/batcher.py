"""Dynamic micro-batching: one inference thread owns the model; requests queue up (bounded) and
are captioned together when they arrive close in time."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..manifest import GenerationOptions
from .settings import Settings


class Overloaded(Exception):
    """The queue is full: shed the request now rather than let latency grow without bound."""


@dataclass
class Job:
    image: object  # RGB PIL image
    options: GenerationOptions
    source: str
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


_STOP = object()


class MicroBatcher:
    """Collects up to ``max_batch`` jobs, waiting at most ``max_wait_ms`` after the first one.

    Jobs with different generation options are captioned in separate groups
    (``Captioner.caption_grouped``). ``on_batch(size)`` is called for each group, for metrics.
    """

    def __init__(self, captioner, *, max_batch: int = Settings.max_batch,
                 max_wait_ms: float = Settings.max_wait_ms, max_queue: int = Settings.max_queue,
                 on_batch=None):
        self.captioner = captioner
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1e3
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda size: None)
        self.thread = threading.Thread(target=self._loop, name="edgecap-inference", daemon=True)
        self.thread.start()

    def depth(self) -> int:
        return self.queue.qsize()

    def submit(self, image, options: GenerationOptions, source: str) -> Future:
        job = Job(image, options, source)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"queue full ({self.max_queue} waiting)") from None
        return job.future

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued job, then end the inference thread."""
        self.queue.put(_STOP)
        self.thread.join(timeout)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self.queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True  # finish what we hold, then end
                    break
                batch.append(job)
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        for jobs, outcome in self.captioner.caption_grouped(batch, admit=self._admit):
            if isinstance(outcome, Exception):  # a group's failure goes to its own waiters
                for job in jobs:
                    job.future.set_exception(outcome)
                continue
            for job, result in zip(jobs, outcome):
                job.future.set_result(result)

    def _admit(self, jobs: list[Job]) -> list[Job]:
        """The jobs still awaited (a timed-out request cancels its future), counted as a batch."""
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if live:
            self.on_batch(len(live))
        return live
