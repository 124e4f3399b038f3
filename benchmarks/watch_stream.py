"""Real-time captioning of a 25 fps 640x480 stream with the default model (not a test).

Encodes a video from Flickr8k test images (one scene every 2 s), plays it at its own frame rate
(``realtime``), and captions the newest frame whenever the captioner is free (scene gate off via
a tiny heartbeat, so this measures the sustained worst case). Reports, as p50/p95, the latency
from a frame's arrival in the reader's mailbox to its caption (``latency_ms`` of the records)
and from the frame's due time on the stream clock to its caption (which adds video decoding and
the wait for the captioner), captions per second and the share of frames dropped.

    python -m benchmarks.watch_stream [--model DIR] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


def encode(path: Path, images: list[Path], fps: int, scene_s: float, size=(640, 480)) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        index = 0
        for image in images:
            frame_array = np.asarray(Image.open(image).convert("RGB").resize(size))
            for _ in range(int(fps * scene_s)):
                frame = av.VideoFrame.from_ndarray(frame_array, format="rgb24")
                frame.pts = index
                index += 1
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv=None) -> int:
    from edgecap import Captioner
    from edgecap.watch.sources import VideoSource
    from edgecap.watch.stream import WatchOptions, watch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="export directory (default: embedded model)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--beams", type=int, help="beam width (default: the model's)")
    parser.add_argument("--scene-gate", action="store_true", help="caption only on scene changes")
    args = parser.parse_args(argv)
    names = [n for n in (FLICKR / "split_test.txt").read_text().split() if n]
    scene_s = 2.0
    images = [FLICKR / "images" / n for n in names[: int(args.seconds / scene_s)]]
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "stream.mp4"
        encode(video, images, args.fps, scene_s)
        captioner = Captioner(args.model)
        options = WatchOptions(realtime=True, heartbeat_s=None if args.scene_gate else 1e-3)
        records, ready = [], []
        started = time.perf_counter()  # stream time 0 is due now (the reader paces from here)
        for record in watch(VideoSource(str(video)), captioner, options, num_beams=args.beams):
            ready.append(time.perf_counter())
            records.append(record)
        wall = time.perf_counter() - started
    total = int(args.fps * scene_s) * len(images)
    latency = [r.latency_ms for r in records]
    # Slightly pessimistic: the reader's clock starts after the file is opened, not before.
    behind = [(at - started - r.stream_time) * 1e3 for at, r in zip(ready, records)]
    dropped = sum(r.dropped for r in records)
    report = {
        "stream": f"{args.fps} fps 640x480, {total} frames, {wall:.1f} s",
        "captions": len(records), "captions_per_s": len(records) / wall,
        "frame_to_caption_ms_p50": float(np.percentile(latency, 50)),
        "frame_to_caption_ms_p95": float(np.percentile(latency, 95)),
        "due_to_caption_ms_p50": float(np.percentile(behind, 50)),
        "due_to_caption_ms_p95": float(np.percentile(behind, 95)),
        "frames_dropped": dropped, "dropped_share": dropped / total,
        "scene_gate": args.scene_gate,
        "beams": args.beams or captioner.manifest.generation.num_beams,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
