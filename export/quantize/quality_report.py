"""``edgecap quality-report``: what quantization cost, measured against the fp32 export.

On the same images: share of identical captions, mean token agreement (position-wise over the
longer caption), caption-metric deltas when references exist, file sizes, and per-part latency
(encoder pass, one decoder step) measured alternately in one run so machine noise hits both.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgecap import Captioner
from edgecap.decoding import greedy_search
from edgecap.preprocess import load_image, to_pixels


def token_agreement(a: list[int], b: list[int]) -> float:
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return sum(x == y for x, y in zip(a, b)) / longest


class StepTimer:
    """A GraphRunner seen through the runtime's own search: times every decoder step it runs."""

    def __init__(self, runner):
        self.runner = runner
        self.step_ms: list[float] = []

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def step(self, state, tokens):
        began = time.perf_counter()
        logits = self.runner.step(state, tokens)
        self.step_ms.append((time.perf_counter() - began) * 1e3)
        return logits


def part_latencies(captioner: Captioner, image: Path, reps: int) -> tuple[list[float], list[float]]:
    """Encoder ms per image and decoder-step ms (batch 1, greedy, ten steps, first two skipped
    as warm-up of the cache-less steps)."""
    manifest = captioner.manifest
    pixels = to_pixels(load_image(image), manifest.preprocessing)[None]
    # min_new_tokens holds the end token back: every repetition times the same ten steps.
    options = captioner.options(num_beams=1, max_new_tokens=10, min_new_tokens=10)
    encoder_ms, step_ms = [], []
    for _ in range(reps):
        timer = StepTimer(captioner.runner)
        began = time.perf_counter()
        cross = timer.encode(pixels)
        encoder_ms.append((time.perf_counter() - began) * 1e3)
        greedy_search(timer, cross, options, manifest.decoder_start_token_id, manifest.eos_token_id)
        step_ms += timer.step_ms[2:]
    return encoder_ms, step_ms


def onnx_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.onnx"))


def quality_report(fp32_dir: Path, quantized_dir: Path, images: list[Path],
                   references: dict[str, list[str]] | None, options: dict | None = None,
                   latency_reps: int = 20, batch_size: int = 16, invariance: bool = True) -> dict:
    from ..evaluate import caption_all, invariance_share

    options = options or {}
    base, quant = Captioner(fp32_dir), Captioner(quantized_dir)
    base_results = caption_all(base, images, batch_size, **options)
    quant_results = caption_all(quant, images, batch_size, **options)
    identical = np.mean([a.token_ids == b.token_ids for a, b in zip(base_results, quant_results)])
    agreement = np.mean([token_agreement(a.token_ids, b.token_ids)
                         for a, b in zip(base_results, quant_results)])
    report = {
        "fp32": str(fp32_dir), "quantized": str(quantized_dir),
        "mode": quant.manifest.quantization.get("mode"), "images": len(images),
        "num_beams": base.options(**options).num_beams,
        "identical_captions": float(identical), "mean_token_agreement": float(agreement),
        "fp32_mb": onnx_bytes(fp32_dir) / 1e6, "quantized_mb": onnx_bytes(quantized_dir) / 1e6,
    }
    report["size_ratio"] = report["quantized_mb"] / report["fp32_mb"]
    if invariance:  # a caption must not depend on the rest of its batch
        report["invariant_at_8"] = {name: invariance_share(captioner, images, 8, **options)
                                    for name, captioner in (("fp32", base), ("quantized", quant))}
    if references:
        from ..evaluate import score_captions

        fp32_scores = score_captions({p.name: r.text for p, r in zip(images, base_results)}, references)
        quant_scores = score_captions({p.name: r.text for p, r in zip(images, quant_results)}, references)
        report["metrics"] = {"fp32": fp32_scores, "quantized": quant_scores,
                             "relative_delta": {k: quant_scores[k] / fp32_scores[k] - 1
                                                for k in fp32_scores if fp32_scores[k]}}
    encoders: dict[str, list[float]] = {"fp32": [], "quantized": []}
    steps: dict[str, list[float]] = {"fp32": [], "quantized": []}
    for _ in range(max(1, latency_reps // 5)):  # alternate in rounds: noise hits both alike
        for name, captioner in (("fp32", base), ("quantized", quant)):
            enc, step = part_latencies(captioner, images[0], 5)
            encoders[name] += enc
            steps[name] += step
    report["latency_ms"] = {
        name: {"encoder_p50": float(np.median(encoders[name])),
               "encoder_p95": float(np.percentile(encoders[name], 95)),
               "decoder_step_p50": float(np.median(steps[name])),
               "decoder_step_p95": float(np.percentile(steps[name], 95))}
        for name in encoders}
    lat = report["latency_ms"]
    report["speedup"] = {
        "encoder": lat["fp32"]["encoder_p50"] / lat["quantized"]["encoder_p50"],
        "decoder_step": lat["fp32"]["decoder_step_p50"] / lat["quantized"]["decoder_step_p50"]}
    return report


def markdown(report: dict) -> str:
    lat, speed = report["latency_ms"], report["speedup"]
    lines = [
        f"| {report['mode']} vs fp32 ({report['images']} images, beams {report['num_beams']}) | value |",
        "|---|---|",
        f"| identical captions | {report['identical_captions']:.1%} |",
        f"| mean token agreement | {report['mean_token_agreement']:.1%} |",
        *[f"| identical alone and in batches of 8 ({name}) | {share:.1%} |"
          for name, share in report.get("invariant_at_8", {}).items()],
        f"| size (ONNX) | {report['quantized_mb']:.1f} MB vs {report['fp32_mb']:.1f} MB "
        f"({report['size_ratio']:.1%}) |",
        f"| encoder p50 | {lat['quantized']['encoder_p50']:.1f} ms vs "
        f"{lat['fp32']['encoder_p50']:.1f} ms ({speed['encoder']:.2f}x) |",
        f"| decoder step p50 | {lat['quantized']['decoder_step_p50']:.2f} ms vs "
        f"{lat['fp32']['decoder_step_p50']:.2f} ms ({speed['decoder_step']:.2f}x) |",
    ]
    for name, delta in report.get("metrics", {}).get("relative_delta", {}).items():
        fp32 = report["metrics"]["fp32"][name]
        quant = report["metrics"]["quantized"][name]
        lines.append(f"| {name} | {quant:.3f} vs {fp32:.3f} ({delta:+.1%}) |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edgecap.options import add_generation_arguments

    parser.add_argument("fp32", type=Path, help="fp32 export directory")
    parser.add_argument("quantized", type=Path, help="quantized export of the same model")
    parser.add_argument("--data", type=Path, help="Flickr8k folder: score against references")
    parser.add_argument("--images", type=Path, help="a folder of images (no references)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=200, help="images to compare (default 200)")
    parser.add_argument("--no-invariance", dest="invariance", action="store_false",
                        help="skip the alone-vs-batch-of-8 check (saves two captioning passes)")
    parser.add_argument("--out", type=Path, help="write the JSON report here (markdown beside it)")
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from edgecap.caption_io import expand_inputs
    from edgecap.options import generation_from_args

    references = None
    if args.data:
        from ..evaluate import load_folder

        images, references = load_folder(args.data, args.split)
    elif args.images:
        images = [Path(p) for p in expand_inputs([str(args.images)])]
    else:
        raise SystemExit("edgecap: error: give --data (Flickr8k) or --images")
    images = images[: args.limit]
    report = quality_report(args.fp32, args.quantized, images, references,
                            generation_from_args(args), invariance=args.invariance)
    text = markdown(report)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        args.out.with_suffix(".md").write_text(text)
    return 0
