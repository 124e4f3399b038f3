"""``python -m benchmarks.gpu``: edgecap on CUDA and TensorRT, fp32 and fp16, against the CPU's
fp32 captions and against PyTorch generate() (fp16) and optimum on CUDA, in one run.

Every system captions the same images one at a time (batch 1, greedy), taking turns image by
image so that drifts in the machine's speed hit all of them alike. For each system: how many
captions equal edgecap's CPU fp32 captions token for token, and p50/p95 latency per caption
(preprocessing included, image decoding not). A system that cannot run here (no GPU provider in
onnxruntime, no CUDA in torch, no optimum) is listed with the reason, never measured on the CPU.
Prints a markdown table and the JSON report, and writes both to --out-dir. docs/deploy.md has
the command a machine with an NVIDIA GPU runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .gpu_systems import (
    Unavailable, edgecap_system, greedy, optimum_system, pytorch_system,
)

HERE = Path(__file__).resolve().parent
FLICKR = HERE.parent.parent / "shared" / "data" / "flickr8k"
log = logging.getLogger("edgecap.bench")


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="edgecap export (fp32) to run everywhere")
    parser.add_argument("--fp16-model", type=Path, help="an fp16 export of the same weights "
                        "(edgecap export --quantize fp16) for the cuda fp16 row")
    parser.add_argument("--trt-model", type=Path, help="the export the tensorrt rows run "
                        "(default --model); a --decoder-graph traced export gives TensorRT the "
                        "whole step graph, where the fused one leaves ONNX Runtime's own "
                        "attention kernels to the CUDA provider")
    parser.add_argument("--hf-dir", type=Path, help="the Hugging Face folder of the same weights, "
                        "for the PyTorch and optimum rows")
    parser.add_argument("--optimum-dir", type=Path, help="optimum's export of those weights "
                        "(default: exported into --work-dir on first use)")
    parser.add_argument("--build-vit-gpt2", action="store_true", help="build the random-weight "
                        "ViT-base + GPT-2 of benchmarks/models.py in --work-dir and use it for "
                        "--model, --fp16-model, --trt-model (traced) and --hf-dir (needs the "
                        "[export] extra)")
    parser.add_argument("--image-dir", type=Path, help="JPEGs to caption (default: the Flickr8k "
                        "test split beside the checkout)")
    parser.add_argument("--images", type=int, default=100,
                        help="how many images (default %(default)s)")
    parser.add_argument("--stage-images", type=Path, metavar="DIR", help="copy the first --images "
                        "Flickr8k test images into DIR and stop (to carry them to a GPU machine)")
    parser.add_argument("--devices", default="cuda,tensorrt",
                        help="comma-separated: cuda, tensorrt, cpu "
                        "(default %(default)s)")
    parser.add_argument("--precisions", default="fp32,fp16",
                        help="comma-separated: fp32, fp16 (default %(default)s)")
    parser.add_argument("--baselines", default="pytorch,optimum",
                        help="pytorch, optimum, or none (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=20,
                        help="longest caption, in tokens (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed captions per system (default %(default)s)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop taking new images "
                        "this many seconds after the start; the report then says how many were "
                        "captioned (default %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache/edgecap/gpu-bench",
                        help="built models, optimum's export and TensorRT engines")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results",
                        help="where the markdown and JSON reports are written")
    args = parser.parse_args(argv)
    if not args.stage_images and not args.model and not args.build_vit_gpt2:
        parser.error("give --model DIR or --build-vit-gpt2")
    return args


def image_paths(image_dir: Path | None, count: int) -> list[Path]:
    if image_dir is not None:
        return sorted(image_dir.glob("*.jpg"))[:count]
    split = FLICKR / "split_test.txt"
    if not split.is_file():
        raise SystemExit(f"no Flickr8k at {FLICKR}: pass --image-dir")
    names = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    return [FLICKR / "images" / name for name in names[:count]]


def build_models(args: argparse.Namespace) -> None:
    """The ViT-base + GPT-2 layout with random weights, its fp32 and fp16 exports and a traced
    fp32 export for TensorRT."""
    from edgecap.export.graphs.onnx_export import export_pretrained

    from .models import ensure_exports

    paths = ensure_exports(args.work_dir, ("none", "fp16"))
    args.model, args.fp16_model, args.hf_dir = paths["none"], paths["fp16"], paths["hf"]
    args.trt_model = args.work_dir / "edgecap-traced"
    if not (args.trt_model / "manifest.json").is_file():
        export_pretrained(paths["hf"], args.trt_model, check_steps=1, fused=False)


def load_systems(args: argparse.Namespace) -> tuple[list, dict[str, str]]:
    """Every requested system that can run here, and why the others cannot."""
    loaders = []
    for device in args.devices.split(","):
        for precision in args.precisions.split(","):
            model = args.fp16_model if (device, precision) == ("cuda", "fp16") else args.model
            if device == "tensorrt" and args.trt_model:
                model = args.trt_model
            name = f"edgecap-{device}-{precision}"
            loaders.append((name, lambda n=name, d=device, p=precision, m=model:
                            _edgecap(args, n, d, p, m)))
        if device in ("cuda", "cpu") and "fp32" in args.precisions:
            # The same graphs with the cache copied through the host at every step (cuda), or
            # kept in OrtValues (cpu): what IO binding changes.
            binding = "off" if device == "cuda" else "on"
            name = f"edgecap-{device}-fp32-io-{binding}"
            loaders.append((name, lambda n=name, d=device, b=binding: edgecap_system(
                n, args.model, d, "fp32", io_binding=b, max_new_tokens=args.max_new_tokens)))
    # Baselines on CUDA; on the CPU only in a CPU-only run (the smoke run's check of their code).
    where = "cpu" if args.devices == "cpu" else "cuda"
    if "pytorch" in args.baselines:
        name = f"pytorch-{where}-{'fp16' if where == 'cuda' else 'fp32'}"
        loaders.append((name, lambda: pytorch_system(_hf(args), where, args.max_new_tokens)))
    if "optimum" in args.baselines:
        loaders.append((f"optimum-{where}-fp32", lambda: optimum_system(
            _hf(args), args.optimum_dir, args.work_dir, where, args.max_new_tokens)))
    systems, skipped = [], {}
    for name, load in loaders:
        try:
            systems.append(load())
            log.info("%s loaded in %.1f s", name, systems[-1].load_s)
        except Unavailable as exc:
            skipped[name] = str(exc)
            log.warning("%s skipped: %s", name, exc)
    return systems, skipped


def _edgecap(args, name: str, device: str, precision: str, model: Path | None):
    if device == "cpu" and precision == "fp16":
        raise Unavailable("the CPU runs the graphs as exported (fp16 is a GPU setting)")
    if model is None:
        raise Unavailable("no fp16 export given (--fp16-model; edgecap export --quantize fp16)")
    precision_arg = "fp32" if device == "cuda" else precision  # cuda: the export's own precision
    return edgecap_system(name, model, device, precision_arg,
                          engine_cache=args.work_dir / "engines",
                          max_new_tokens=args.max_new_tokens)


def _hf(args) -> Path:
    if args.hf_dir is None:
        raise Unavailable("no --hf-dir with the same weights")
    return args.hf_dir


def reference_tokens(model: Path, images: list, max_new_tokens: int) -> list[list[int]]:
    """edgecap's CPU fp32 captions, the yardstick every GPU row is compared with."""
    from edgecap import Captioner

    captioner = Captioner(model, device="cpu", io_binding="off")
    options = captioner.options(**greedy(max_new_tokens))
    tokens = []
    for start in range(0, len(images), 8):  # captions do not depend on their batch
        batch = images[start : start + 8]
        results = captioner.caption_loaded(batch, options, ["image"] * len(batch))
        tokens += [r.token_ids for r in results]
    return tokens


def run_alternating(systems: list, images: list, warmup: int, deadline: float) -> dict:
    """Each system captions each image in turn; stops between images once past ``deadline``."""
    for system in systems:
        for image in images[:warmup]:
            system.caption(image)
    runs = {s.name: {"latency_ms": [], "tokens": []} for s in systems}
    for image in images:
        if time.perf_counter() > deadline:
            log.warning("time budget spent after %d images", len(runs[systems[0].name]["tokens"]))
            break
        for system in systems:
            began = time.perf_counter()
            tokens = system.caption(image)
            runs[system.name]["latency_ms"].append((time.perf_counter() - began) * 1e3)
            runs[system.name]["tokens"].append(tokens)
    return runs


def summarize(systems: list, runs: dict, reference: list[list[int]]) -> dict:
    rows = {}
    for system in systems:
        run = runs[system.name]
        latency = np.asarray(run["latency_ms"])
        tokens = sum(max(1, len(t)) for t in run["tokens"])
        rows[system.name] = {
            "images": len(latency),
            "identical_to_cpu_fp32": sum(t == r for t, r in zip(run["tokens"], reference)),
            "p50_ms": float(np.percentile(latency, 50)) if len(latency) else None,
            "p95_ms": float(np.percentile(latency, 95)) if len(latency) else None,
            "ms_per_token": float(latency.sum() / tokens) if len(latency) else None,
            "load_s": system.load_s, **system.notes,
        }
    for base in ("optimum", "pytorch"):
        base_p50 = next((row["p50_ms"] for name, row in rows.items()
                         if name.startswith(base + "-")), None)
        for row in rows.values():
            ratio = base_p50 / row["p50_ms"] if base_p50 and row["p50_ms"] else None
            row[f"speedup_vs_{base}"] = ratio  # above 1: faster than the baseline
    return rows


def markdown(report: dict) -> str:
    lines = [f"{report['date']}, {report['gpu']}, onnxruntime {report['onnxruntime']}, model: "
             f"{report['model']}, batch 1 greedy, at most {report['max_new_tokens']} new tokens.",
             "", "| system | images | identical to CPU fp32 | p50 ms | p95 ms | ms/token | "
             "vs optimum | vs PyTorch | load s |", "|---" * 9 + "|"]

    def num(value, spec, unit=""):
        return "-" if value is None else format(value, spec) + unit

    for name, row in report["systems"].items():
        lines.append(f"| {name} | {row['images']} | {row['identical_to_cpu_fp32']}/"
                     f"{row['images']} | {num(row['p50_ms'], '.1f')} | "
                     f"{num(row['p95_ms'], '.1f')} | {num(row['ms_per_token'], '.2f')} | "
                     f"{num(row['speedup_vs_optimum'], '.2f', 'x')} | "
                     f"{num(row['speedup_vs_pytorch'], '.2f', 'x')} | "
                     f"{row['load_s']:.1f} |")
    for name, reason in report["skipped"].items():
        lines.append(f"| {name} | skipped: {reason} | | | | | | | |")
    return "\n".join(lines) + "\n"


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    except ImportError:
        return "unknown GPU (no torch to ask)"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    started = time.perf_counter()
    paths = image_paths(args.image_dir, args.images)
    if args.stage_images:
        args.stage_images.mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copy2(path, args.stage_images / path.name)
        print(f"copied {len(paths)} images into {args.stage_images}", file=sys.stderr)
        return 0
    if args.build_vit_gpt2:
        build_models(args)
    import onnxruntime as ort

    from edgecap.preprocess import load_image

    images = [load_image(path) for path in paths]
    log.info("%d images; CPU fp32 reference captions", len(images))
    reference = reference_tokens(args.model, images, args.max_new_tokens)
    systems, skipped = load_systems(args)
    runs = run_alternating(systems, images, args.warmup, started + args.budget_s)
    report = {
        "date": datetime.date.today().isoformat(), "gpu": gpu_name(),
        "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
        "model": str(args.model), "images": len(images), "max_new_tokens": args.max_new_tokens,
        "systems": summarize(systems, runs, reference), "skipped": skipped,
        "wall_s": time.perf_counter() - started,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report['date']}-gpu"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
