"""Caption speed of batch-invariant int8 against the per-tensor int8-dynamic it replaces.

Both exports caption the same Flickr8k test images, alternating batch by batch so machine noise
hits both alike; per-image latency (batch time / batch size) p50/p95 and the ratio of p50s
(>1: the invariant export is faster).

    python -m benchmarks.invariance_speed BASELINE_DIR INVARIANT_DIR [--batch-sizes 1 8]
        [--beams 1 3] [--images 48] [--rounds 3]

``--vit-gpt2 ROOT`` first builds the ViT-base + GPT-2 layout (random weights) under ROOT: its
per-tensor int8-dynamic export and the same export made batch-invariant (decoder scales
calibrated on Flickr8k train images), then times those two.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


def split_images(split: str, count: int) -> list[Path]:
    names = [n for n in (FLICKR / f"split_{split}.txt").read_text().split() if n][:count]
    return [FLICKR / "images" / n for n in names]


def build_vit_gpt2_pair(root: Path, calibration_count: int) -> tuple[Path, Path]:
    """(per-tensor int8-dynamic, batch-invariant) exports of the ViT-base + GPT-2 layout."""
    import shutil
    from unittest import mock

    from edgecap.export.quantize import variants as quantize
    from edgecap.export.quantize.batch_invariant import make_batch_invariant
    from edgecap.export.graphs.onnx_export import export_pretrained
    from edgecap.manifest import Manifest

    from .models import build_vit_gpt2

    fp32, baseline, invariant = root / "fp32", root / "int8-per-tensor", root / "int8-invariant"
    if not (fp32 / "manifest.json").is_file():
        export_pretrained(build_vit_gpt2(root / "hf"), fp32)
    if not (baseline / "manifest.json").is_file():
        # The format before batch invariance: quantize_dynamic's per-tensor activation scales.
        with mock.patch.object(
            quantize, "_batch_invariant", lambda staging, *_: Manifest.read(staging)
        ):
            quantize.quantize_export(fp32, baseline, mode="int8-dynamic")
    if not (invariant / "manifest.json").is_file():
        shutil.copytree(baseline, invariant)
        make_batch_invariant(invariant, split_images("train", calibration_count))
    return baseline, invariant


def time_pair(
    models: dict[str, Path], images: list[Path], batch_size: int, beams: int, rounds: int
) -> dict:
    """Per-image ms of each model, batches alternating between the models."""
    from edgecap import Captioner

    captioners = {name: Captioner(path) for name, path in models.items()}
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    times: dict[str, list[float]] = {name: [] for name in models}
    for captioner in captioners.values():
        captioner.caption(batches[0], batch_size=batch_size, num_beams=beams)  # warm-up
    turn = 0
    for _ in range(rounds):
        for batch in batches:
            turn += 1
            order = list(captioners.items())
            for name, captioner in order if turn % 2 else order[::-1]:  # neither always first
                began = time.perf_counter()
                captioner.caption(batch, batch_size=batch_size, num_beams=beams)
                times[name].append((time.perf_counter() - began) * 1e3 / len(batch))
    report = {
        name: {"p50_ms": float(np.percentile(t, 50)), "p95_ms": float(np.percentile(t, 95))}
        for name, t in times.items()
    }
    first, second = list(report)
    report["ratio_p50"] = report[first]["p50_ms"] / report[second]["p50_ms"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="baseline and invariant export dirs")
    parser.add_argument(
        "--vit-gpt2", type=Path, help="build and time the ViT-base + GPT-2 pair here"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibration-count", type=int, default=32)
    args = parser.parse_args(argv)
    if args.vit_gpt2:
        baseline, invariant = build_vit_gpt2_pair(args.vit_gpt2, args.calibration_count)
    elif len(args.models) == 2:
        baseline, invariant = args.models
    else:
        parser.error("give BASELINE_DIR INVARIANT_DIR, or --vit-gpt2 ROOT")
    models = {"int8-dynamic (per tensor)": baseline, "int8 (batch-invariant)": invariant}
    images = split_images("test", args.images)
    report = {}
    for beams in args.beams:
        for batch_size in args.batch_sizes:
            result = time_pair(models, images, batch_size, beams, args.rounds)
            report[f"beams={beams} batch={batch_size}"] = result
            print(f"beams={beams} batch={batch_size}: " + json.dumps(result), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
