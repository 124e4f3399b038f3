"""``watch --archive``: each caption record into the archive, with an optional snapshot, and
retention in a background thread so pruning never blocks captioning.

The record is committed to SQLite before any other output sees it (``run_watch`` puts this
writer first), so whatever a killed watcher already printed or appended to ``--out`` is in the
archive too.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .schema import ArchiveError
from .store import Archive

log = logging.getLogger("edgecap.watch")

SNAPSHOT_SIDE = 320  # longest side of a saved snapshot: enough to recognise a scene, small on disk


def default_camera(source: str) -> str:
    """A camera name from a source: a file's or folder's stem, a stream's last path part or host."""
    if "://" in source:
        url = urlparse(source)
        return Path(url.path).stem or url.hostname or "camera"
    return Path(source.rstrip("/")).stem or "camera"


def _safe(name: str) -> str:
    """``name`` reduced to characters that are safe in one file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "camera"


@dataclass(frozen=True)
class Retention:
    keep_days: float | None = None
    max_disk_mb: float | None = None
    every_s: float = 10.0  # how often the background thread prunes

    @property
    def enabled(self) -> bool:
        return self.keep_days is not None or self.max_disk_mb is not None


class ArchiveWriter:
    """A watch output that archives each record (and its frame as a JPEG snapshot).

    Raises:
        ArchiveError: the archive cannot be opened or created, or the snapshot folder cannot be
            made (named, with the reason).
    """

    def __init__(self, path: Path, camera: str, snapshots: Path | None = None,
                 retention: Retention = Retention()):
        self.path, self.camera, self.snapshots = Path(path), camera, snapshots
        if snapshots is not None:
            try:
                # Owner-only: the frames show the inside of homes and shops.
                snapshots.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise ArchiveError(f"{snapshots}: cannot create the snapshot folder "
                                   f"({exc.strerror or exc})") from None
        self.archive = Archive.open(self.path)
        self.failures = 0  # records or snapshots that could not be written (logged)
        self.stop = threading.Event()
        self.pruner = None
        if retention.enabled:
            self.pruner = threading.Thread(target=self._prune_loop, args=(retention,),
                                           name="edgecap-prune", daemon=True)
            self.pruner.start()

    def add(self, record) -> None:
        """Archive ``record`` (a watch ``CaptionRecord``); its snapshot path is set on it, so
        the outputs after this one (JSON lines, alerts) can name the file."""
        if self.snapshots is not None:
            record.snapshot = self._snapshot(record)
        data = record.to_record()
        data["camera"] = record.camera or self.camera
        try:
            self.archive.add(data)
        except ArchiveError as exc:  # e.g. another writer held the lock past the timeout
            self.failures += 1
            log.error("archive: %s: record of frame %s not archived: %s",
                      self.path, record.frame_index, exc)

    def _snapshot(self, record) -> str | None:
        image = getattr(record, "image", None)
        if image is None:
            return None
        stamp = record.wall_time.replace("-", "").replace(":", "").replace("+0000", "Z")
        camera = _safe(record.camera or self.camera)
        path = self.snapshots / f"{camera}_{_safe(stamp)}_{record.frame_index}.jpg"
        try:
            thumbnail = image.copy()
            thumbnail.thumbnail((SNAPSHOT_SIDE, SNAPSHOT_SIDE))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as file:
                thumbnail.save(file, "JPEG", quality=80)
        except OSError as exc:  # a full disk costs the snapshot, never the caption
            self.failures += 1
            log.error("snapshot %s not written: %s", path, exc)
            return None
        return str(path)

    def _prune_loop(self, retention: Retention) -> None:
        """Prune now and every ``every_s``, on a connection of its own, so a prune waits only on
        SQLite's short per-batch write locks and captioning never waits on the prune."""
        try:
            with Archive.open(self.path) as archive:
                while True:
                    try:
                        stats = archive.prune(keep_days=retention.keep_days,
                                              max_disk_mb=retention.max_disk_mb)
                        if stats.rows_deleted:
                            log.info("archive: pruned %s", stats)
                    except ArchiveError as exc:
                        log.error("archive: pruning failed: %s", exc)
                    if self.stop.wait(retention.every_s):
                        return
        except ArchiveError as exc:
            log.error("archive: pruning stopped: %s", exc)

    def close(self) -> None:
        self.stop.set()
        if self.pruner is not None:
            self.pruner.join(timeout=30)
        self.archive.close()
