"""End-to-end caption latency of one or more exports on Flickr8k test images, batch 1.

Alternates the models image by image so machine noise hits all of them alike; reports p50/p95
of the total (load + preprocess + encoder + decode) per image, greedy and beam.

    python -m benchmarks.default_latency [MODEL_DIR ...] [--images 100] [--beams 1 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


def main(argv=None) -> int:
    from edgecap import Captioner

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", help="export directories (default: embedded model)")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3])
    args = parser.parse_args(argv)
    names = [n for n in (FLICKR / "split_test.txt").read_text().split() if n][: args.images]
    paths = [FLICKR / "images" / n for n in names]
    models = {m: Captioner(m) for m in (args.models or [None])}
    report = {}
    for beams in args.beams:
        times: dict[str, list[float]] = {str(m): [] for m in models}
        parts: dict[str, list[dict]] = {str(m): [] for m in models}
        for captioner in models.values():
            captioner.caption(paths[0], num_beams=beams)  # warm-up
        for path in paths:
            for name, captioner in models.items():
                began = time.perf_counter()
                result = captioner.caption(path, num_beams=beams)
                times[str(name)].append((time.perf_counter() - began) * 1e3)
                parts[str(name)].append(result.timings)
        for name, values in times.items():
            report[f"{name} beams={beams}"] = {
                "p50_ms": float(np.percentile(values, 50)),
                "p95_ms": float(np.percentile(values, 95)),
                "encoder_ms_p50": float(np.median([t["encoder_ms"] for t in parts[name]])),
                "decoder_ms_p50": float(np.median([t["decoder_ms"] for t in parts[name]])),
                "images": len(values),
            }
    from .environment import environment

    report["environment"] = environment()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
