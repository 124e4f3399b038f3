"""Many cameras on one small box (not a test): N live 10 fps 640x480 streams captioned by one
``watch --config`` process (one shared model) against N separate ``watch`` processes, in the
same run, alternating.

Each camera plays its own video at its own frame rate (``--realtime``, the live-source policy:
newest frame only, stale frames dropped), and a tiny heartbeat makes every new frame worth a
caption (the sustained worst case, as in benchmarks.watch_stream). Reports per camera captions/s, frame-to-caption
latency p50/p95 and the share of frames dropped, plus the total captions/s and the peak RSS of
the processes (summed over the N processes).

    python -m benchmarks.cameras [--counts 1 2 4 8] [--seconds 20] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import emit_report
from .watch_stream import encode

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "data"
FPS = 10
HEARTBEAT_S = 0.001  # every new frame is worth a caption: the sustained worst case


def videos(folder: Path, count: int, seconds: float) -> list[Path]:
    photos = sorted(PHOTOS.glob("*.jpg"))
    paths = []
    for camera in range(count):
        scenes = [photos[(camera * 3 + i) % len(photos)] for i in range(int(seconds / 2.0))]
        paths.append(folder / f"camera{camera}.mp4")
        encode(paths[-1], scenes, FPS, 2.0)
    return paths


def wait_all(processes: list[subprocess.Popen]) -> float:
    """Wait for every process; the sum of their peak RSS in MB (Linux: ru_maxrss in kB)."""
    peak_kb = 0
    for process in processes:
        _, _, usage = os.wait4(process.pid, 0)
        process.returncode = 0
        peak_kb += usage.ru_maxrss
    return peak_kb / 1024


def shared(paths: list[Path], folder: Path, model: list[str]) -> tuple[list[dict], float, float]:
    config = folder / "cameras.toml"
    config.write_text("".join(f'[[camera]]\nname = "cam{i}"\nsource = "{p}"\nrealtime = true\n'
                              f'heartbeat = {HEARTBEAT_S}\n\n'
                              for i, p in enumerate(paths)))
    out = folder / f"shared-{len(paths)}.jsonl"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "edgecap.cli", "watch", "--config",
                                str(config), "--out", str(out), *model],
                               stderr=subprocess.DEVNULL)
    rss = wait_all([process])
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return [[r for r in records if r["camera"] == f"cam{i}"] for i in range(len(paths))], rss, wall


def separate(paths: list[Path], folder: Path, model: list[str]) -> tuple[list[dict], float, float]:
    outs = [folder / f"separate-{len(paths)}-{i}.jsonl" for i in range(len(paths))]
    started = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-m", "edgecap.cli", "watch", str(p),
                                   "--realtime", "--heartbeat", str(HEARTBEAT_S),
                                   "--out", str(o), *model],
                                  stderr=subprocess.DEVNULL) for p, o in zip(paths, outs)]
    rss = wait_all(processes)
    wall = time.perf_counter() - started
    return [[json.loads(line) for line in o.read_text().splitlines()] for o in outs], rss, wall


def summary(per_camera: list[list[dict]], rss: float, seconds: float) -> dict:
    frames = seconds * FPS
    cameras = []
    for records in per_camera:
        latency = [r["latency_ms"] for r in records] or [float("nan")]
        dropped = sum(r["dropped"] for r in records)
        cameras.append({"captions_per_s": len(records) / seconds,
                        "frame_to_caption_ms_p50": float(np.percentile(latency, 50)),
                        "frame_to_caption_ms_p95": float(np.percentile(latency, 95)),
                        "dropped_share": dropped / frames})
    return {"total_captions_per_s": sum(c["captions_per_s"] for c in cameras),
            "peak_rss_mb": rss, "cameras": cameras}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="export directory (default: embedded model)")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each stream")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    model = ["--model", args.model] if args.model else []
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = videos(Path(tmp), max(args.counts), args.seconds)
        for count in args.counts:
            row = {}
            for mode, run in (("shared", shared), ("separate", separate)):
                per_camera, rss, _ = run(paths[:count], Path(tmp), model)
                row[mode] = summary(per_camera, rss, args.seconds)
            report[count] = row
            print(f"{count} cameras: shared {row['shared']['total_captions_per_s']:.1f}/s "
                  f"{row['shared']['peak_rss_mb']:.0f} MB; separate "
                  f"{row['separate']['total_captions_per_s']:.1f}/s "
                  f"{row['separate']['peak_rss_mb']:.0f} MB", file=sys.stderr)
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
