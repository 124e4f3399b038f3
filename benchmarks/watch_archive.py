"""What the archive costs a live watcher (not a test): a 25 fps 640x480 stream captioned with
the default model, with and without ``--archive --snapshots``, alternating in one run.

The video is made from the photos in tests/data (one scene every 2 s) and played at its own
frame rate; a tiny heartbeat keeps the captioner busy (the sustained worst case). Reports
captions per second and frame-to-caption latency p50/p95 for each mode, and their ratio.

    python -m benchmarks.watch_archive [--seconds 30] [--rounds 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import emit_report
from .watch_stream import encode

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "data"


def run_once(video: Path, captioner, folder: Path | None) -> dict:
    from edgecap.watch.sources import VideoSource
    from edgecap.watch.stream import WatchOptions, watch

    writer = None
    if folder is not None:
        from edgecap.archive.writer import ArchiveWriter

        writer = ArchiveWriter(folder / "events.db", "bench", folder / "snapshots")
    options = WatchOptions(realtime=True, heartbeat_s=1e-3, camera="bench")
    latencies, started = [], time.perf_counter()
    try:
        for record in watch(VideoSource(str(video)), captioner, options):
            if writer is not None:
                writer.add(record)
            latencies.append(record.latency_ms)
    finally:
        if writer is not None:
            writer.close()
    wall = time.perf_counter() - started
    return {"captions_per_s": len(latencies) / wall,
            "frame_to_caption_ms_p50": float(np.percentile(latencies, 50)),
            "frame_to_caption_ms_p95": float(np.percentile(latencies, 95)),
            "captions": len(latencies)}


def main(argv=None) -> int:
    from edgecap import Captioner

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="export directory (default: embedded model)")
    parser.add_argument("--seconds", type=float, default=30.0, help="stream length per run")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds (alternating)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    photos = sorted(PHOTOS.glob("*.jpg"))
    images = [photos[i % len(photos)] for i in range(int(args.seconds / 2.0))]
    captioner = Captioner(args.model)
    runs: dict[str, list[dict]] = {"plain": [], "archive+snapshots": []}
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "stream.mp4"
        encode(video, images, 25, 2.0)
        for round_ in range(args.rounds):
            for mode in runs:  # alternate: the machine's drift hits both alike
                folder = Path(tmp) / f"{mode}-{round_}" if mode != "plain" else None
                if folder is not None:
                    folder.mkdir()
                runs[mode].append(run_once(video, captioner, folder))
                print(f"{mode} round {round_}: {runs[mode][-1]}", file=sys.stderr)
    report = {mode: {key: float(np.median([r[key] for r in results])) for key in results[0]}
              for mode, results in runs.items()}
    report["ratio_captions_per_s"] = (report["archive+snapshots"]["captions_per_s"]
                                      / report["plain"]["captions_per_s"])
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
