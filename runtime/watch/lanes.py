"""Inference lanes of ``watch --config``: how many callers caption at once over the one model.

A lane is a thread that takes frames from the camera scheduler and captions them with the shared
``Captioner``. Every lane calls the same encoder and decoder sessions (one set of weights in
memory; onnxruntime's ``run`` may be called from several threads at once). A run computes on its
calling thread plus the session's intra-op pool, which all lanes share, so the sessions get the
threads that the lanes themselves do not use: threads 2 and lanes 2 give two lanes of one
thread each and no pool. On a small CPU, two one-thread pipelines caption more frames per second
than one two-thread pipeline, because a decoder step's small kernels leave a second thread
mostly waiting.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ..options import Option, parse_integer

log = logging.getLogger("edgecap.watch")

# Bounds what a typo can start (a thread and its working memory per lane).
MAX_LANES = 64

LANES = Option(
    "lanes", parse_integer, "with --config: callers that caption at once over the one model, "
    "sharing --threads (default: one lane per thread, at most one per camera)",
    {"type": "integer", "minimum": 1, "maximum": MAX_LANES}, metavar="N")


@dataclass(frozen=True)
class LanePlan:
    """How ``watch --config`` runs: ``lanes`` callers over sessions of ``threads`` intra-op
    threads (each run: its lane's thread plus the pool of ``threads - 1`` that lanes share)."""

    lanes: int
    threads: int

    def __str__(self) -> str:
        return (f"{self.lanes} lane{'s' if self.lanes != 1 else ''}, sessions of {self.threads} "
                f"thread{'s' if self.threads != 1 else ''}")


def plan_lanes(requested: int | None, threads: int, cameras: int) -> LanePlan:
    """The lanes for ``cameras`` cameras on ``threads`` intra-op threads.

    Args:
        requested: ``--lanes`` or the config's ``lanes``; None: one lane per thread.
        threads: the intra-op threads the user gave (or the cores this process may use).
        cameras: how many cameras the config has.
    Returns:
        At most one lane per camera (a camera is captioned by one lane at a time, so more would
        wait), and sessions whose shared pool and the lanes' own threads add up to ``threads``
        (at least one thread each: more lanes than threads share the cores).
    """
    lanes = requested if requested is not None else threads
    if lanes > cameras:
        if requested is not None:
            log.info("lanes %d: %d cameras use at most %d", lanes, cameras, cameras)
        lanes = cameras
    lanes = max(1, lanes)
    return LanePlan(lanes=lanes, threads=max(1, threads - lanes + 1))


class LaneStats:
    """Captions, batches and busy seconds per lane, written by the lanes and read by metrics
    and the end-of-run summary."""

    def __init__(self, lanes: int):
        self.lock = threading.Lock()
        self.captions = [0] * lanes
        self.batches = [0] * lanes
        self.busy_s = [0.0] * lanes

    def add(self, lane: int, captions: int, seconds: float) -> None:
        with self.lock:
            self.captions[lane] += captions
            self.batches[lane] += 1
            self.busy_s[lane] += seconds

    def snapshot(self) -> list[dict[str, float]]:
        """One ``{"captions", "batches", "busy_s"}`` per lane, consistent across lanes."""
        with self.lock:
            return [{"captions": c, "batches": b, "busy_s": s}
                    for c, b, s in zip(self.captions, self.batches, self.busy_s)]

    def summary(self) -> str:
        """``lane 0: 120 captions, lane 1: 118 captions`` for the end-of-run line."""
        return ", ".join(f"lane {i}: {lane['captions']} captions"
                         for i, lane in enumerate(self.snapshot()))
