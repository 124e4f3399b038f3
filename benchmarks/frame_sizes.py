"""Decoding at the size the model needs, exact against reduced decodes, in one run each:

* ``latency``: end-to-end ``Captioner.caption(path)`` (read, decode, preprocess, encoder,
  greedy decode) of the default model on 256-pixel, 1080p and 4K JPEGs made from Flickr8k test
  images (upscaled, quality 90). Sizes and the two modes are interleaved image by image, so
  machine noise hits all alike; p50/p95 and the ratios to the 256-pixel p50 of the same mode.
* ``cider``: Flickr8k test captions (the model's default generation, as ``edgecap eval``) of the
  images as shipped (224x224: under the threshold, so both modes must give identical captions)
  and of the same images upscaled to a 4K JPEG (the largest reduction, 1/8), both modes.
* ``watch``: ``watch`` on a 1080p and a 4K 25 fps stream played in real time (heartbeat on every
  frame: the sustained worst case, as benchmarks/watch_stream.py), captions/s and p50/p95 frame-
  to-caption latency, the two modes alternated.

    python -m benchmarks.frame_sizes [--parts latency cider watch] [--images 30]
        [--cider-images 1000] [--stream-seconds 16] [--out results.json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
SIZES = {"256": (256, 256), "1080p": (1920, 1080), "4k": (3840, 2160)}
MODES = ("exact", "reduced")


def test_names(count: int) -> list[str]:
    return [n for n in (FLICKR / "split_test.txt").read_text().split() if n][:count]


def upscaled_jpeg(name: str, size: tuple[int, int]) -> bytes:
    image = Image.open(FLICKR / "images" / name).convert("RGB")
    buffer = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def captioners() -> dict[str, object]:
    from edgecap import Captioner

    return {"exact": Captioner(exact_preprocessing=True), "reduced": Captioner()}


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(values, 50)), 2),
            "p95_ms": round(float(np.percentile(values, 95)), 2), "n": len(values)}


def latency(images: int, repeats: int) -> dict:
    models = captioners()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name in test_names(images):
            for size_name, size in SIZES.items():
                path = Path(tmp) / f"{size_name}-{name}"
                path.write_bytes(upscaled_jpeg(name, size))
                paths.setdefault(name, {})[size_name] = path
        for captioner in models.values():  # warm-up: first runs allocate
            for path in next(iter(paths.values())).values():
                captioner.caption(path, num_beams=1)
        times = {(s, m): [] for s in SIZES for m in MODES}
        decode = {(s, m): [] for s in SIZES for m in MODES}
        turn = 0
        for _ in range(repeats):
            for by_size in paths.values():
                order = [(s, m) for s in SIZES for m in MODES]
                turn += 1
                for size_name, mode in order[turn % len(order):] + order[:turn % len(order)]:
                    began = time.perf_counter()
                    result = models[mode].caption(by_size[size_name], num_beams=1)
                    times[(size_name, mode)].append((time.perf_counter() - began) * 1e3)
                    decode[(size_name, mode)].append(result.timings["preprocess_ms"])
    rows = {}
    for (size_name, mode), values in times.items():
        row = summary(values)
        row["read_decode_preprocess_p50_ms"] = round(float(np.median(decode[(size_name, mode)])), 2)
        row["ratio_to_256_p50"] = round(row["p50_ms"] / float(np.median(times[("256", mode)])), 3)
        rows[f"{size_name} {mode}"] = row
    for size_name in SIZES:
        rows[f"{size_name} exact/reduced p50"] = round(
            rows[f"{size_name} exact"]["p50_ms"] / rows[f"{size_name} reduced"]["p50_ms"], 3)
    return rows


def cider(count: int, chunk: int = 40) -> dict:
    from edgecap.export.evaluate import load_folder, score_captions

    models = captioners()
    _, references = load_folder(FLICKR, "test")
    names = test_names(count)
    captions = {(v, m): {} for v in ("native", "4k") for m in MODES}
    for start in range(0, len(names), chunk):
        part = names[start:start + chunk]
        inputs = {"native": [(n, (FLICKR / "images" / n).read_bytes()) for n in part],
                  "4k": [(n, upscaled_jpeg(n, SIZES["4k"])) for n in part]}
        for variant, items in inputs.items():
            for mode, captioner in models.items():
                for outcome in captioner.caption_stream(items, batch_size=8):
                    captions[(variant, mode)][outcome.source] = outcome.text
        print(f"cider: {start + len(part)}/{len(names)}", file=sys.stderr, flush=True)
    rows = {}
    for (variant, mode), hypotheses in captions.items():
        scores = score_captions(hypotheses, references, meteor=False)
        rows[f"{variant} {mode}"] = {"CIDEr": round(scores["CIDEr"], 4),
                                     "BLEU-4": round(scores["BLEU-4"], 4),
                                     "images": len(hypotheses)}
    for variant in ("native", "4k"):
        exact, reduced = captions[(variant, "exact")], captions[(variant, "reduced")]
        rows[f"{variant} identical captions"] = sum(exact[n] == reduced[n] for n in exact)
    return rows


def watch_run(video: Path, captioner) -> dict:
    from edgecap.watch.sources import VideoSource
    from edgecap.watch.stream import WatchOptions, watch

    options = WatchOptions(realtime=True, heartbeat_s=1e-3)
    records, ready = [], []
    started = time.perf_counter()
    for record in watch(VideoSource(str(video)), captioner, options):
        ready.append(time.perf_counter())
        records.append(record)
    wall = time.perf_counter() - started
    behind = [(at - started - r.stream_time) * 1e3 for at, r in zip(ready, records)]
    return {"captions_per_s": round(len(records) / wall, 2),
            "frame_to_caption": summary([r.latency_ms for r in records]),
            "due_to_caption": summary(behind),
            "dropped_share": round(sum(r.dropped for r in records)
                                   / max(1, sum(r.dropped for r in records) + len(records)), 3)}


def watch_streams(seconds: float, fps: int = 25, rounds: int = 2) -> dict:
    from .watch_stream import encode

    models = captioners()
    scene_s = 2.0
    images = [FLICKR / "images" / n for n in test_names(int(seconds / scene_s))]
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        videos = {}
        for size_name in ("1080p", "4k"):
            videos[size_name] = Path(tmp) / f"{size_name}.mp4"
            encode(videos[size_name], images, fps, scene_s, size=SIZES[size_name])
        for index in range(rounds):  # alternate the order so drift hits both modes
            modes = MODES if index % 2 == 0 else MODES[::-1]
            for size_name, video in videos.items():
                for mode in modes:
                    runs.setdefault(f"{size_name} {mode}", []).append(
                        watch_run(video, models[mode]))
    return {key: {"rounds": value} for key, value in runs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["latency", "cider", "watch"],
                        choices=["latency", "cider", "watch"])
    parser.add_argument("--images", type=int, default=30, help="latency: images per size")
    parser.add_argument("--repeats", type=int, default=2, help="latency: passes over them")
    parser.add_argument("--cider-images", type=int, default=1000)
    parser.add_argument("--stream-seconds", type=float, default=16.0)
    parser.add_argument("--out", type=Path, help="also write the report here (JSON)")
    args = parser.parse_args(argv)
    from .environment import environment

    report: dict = {"environment": environment()}
    if "latency" in args.parts:
        report["latency_greedy"] = latency(args.images, args.repeats)
    if "cider" in args.parts:
        report["cider"] = cider(args.cider_images)
    if "watch" in args.parts:
        report["watch"] = watch_streams(args.stream_seconds)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
