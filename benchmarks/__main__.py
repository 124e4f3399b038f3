"""``python -m benchmarks``: edgecap vs PyTorch generate() vs optimum, same weights, one run.

Each system runs in its own worker process (so its peak RSS and cold start are its own), one
after another on the same machine; ratios are against PyTorch measured in the same run.
Writes benchmarks/results/<date>-<machine>.{json,md} and PNG plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .models import ensure_exports

HERE = Path(__file__).resolve().parent
FLICKR = HERE.parents[0].parent / "shared" / "data" / "flickr8k"
log = logging.getLogger("edgecap.bench")


def machine_name() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40]
    return f"{slug}-{len(os.sched_getaffinity(0))}core"


def optimum_exports(hf_dir: Path, root: Path) -> dict[str, Path]:
    """optimum's own ONNX export of the same weights, and its dynamic int8 version if it works."""
    out = {}
    fp32 = root / "optimum-fp32"
    if not (fp32 / "encoder_model.onnx").is_file():
        from optimum.onnxruntime import ORTModelForVision2Seq

        ORTModelForVision2Seq.from_pretrained(hf_dir, export=True).save_pretrained(fp32)
        for name in ("preprocessor_config.json",):
            (fp32 / name).write_bytes((hf_dir / name).read_bytes())
    out["optimum-fp32"] = fp32
    int8 = root / "optimum-int8"
    try:
        if not (int8 / "encoder_model_quantized.onnx").is_file() and not (int8 / "done").is_file():
            from optimum.onnxruntime import ORTQuantizer
            from optimum.onnxruntime.configuration import AutoQuantizationConfig

            config = AutoQuantizationConfig.avx2(is_static=False, per_channel=False)
            for name in ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"):
                ORTQuantizer.from_pretrained(fp32, file_name=name).quantize(
                    save_dir=int8, quantization_config=config)
            for item in fp32.glob("*.json"):
                (int8 / item.name).write_bytes(item.read_bytes())
            (int8 / "done").write_text("")
        out["optimum-int8"] = int8
    except Exception as exc:  # noqa: BLE001 - report, don't abort the whole benchmark
        log.warning("optimum int8 quantization failed, skipping it: %s", exc)
    return out


def run_worker(system: str, model_dir: Path, images: list[str], cases: str, reps: int,
               budget: float, optimum_dir: Path | None = None) -> dict | None:
    command = [sys.executable, "-m", "benchmarks.worker", "--system", system,
               "--model-dir", str(model_dir), "--images", *images, "--cases", cases,
               "--reps", str(reps), "--budget-s", str(budget), "--launched-at", str(time.time())]
    if optimum_dir:
        command += ["--optimum-dir", str(optimum_dir)]
    proc = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("%s failed:\n%s", system, proc.stderr[-3000:])
        return None
    sys.stderr.write("".join(l + "\n" for l in proc.stderr.splitlines() if " p50 " in l))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(reports: list[dict]) -> dict:
    """Per system and case: per-image percentiles, throughput, ratios vs PyTorch."""
    table = {}
    for report in reports:
        for case, data in report["cases"].items():
            per_image = np.asarray(data["latency_ms"]) / data["batch"]
            table.setdefault(case, {})[report["system"]] = {
                "p50_ms": float(np.percentile(per_image, 50)),
                "p95_ms": float(np.percentile(per_image, 95)),
                "p99_ms": float(np.percentile(per_image, 99)),
                "images_per_s": 1e3 / float(np.mean(per_image)),
                "encoder_ms": data["encoder_ms"],
                "decode_ms_per_token": data["decode_ms_per_token"],
                "reps": len(per_image) // 1,
            }
    for case, systems in table.items():
        base = systems.get("pytorch", {}).get("p50_ms")
        for row in systems.values():
            row["speedup_vs_pytorch"] = base / row["p50_ms"] if base else None
    return table


def equal_work(reports: list[dict]) -> dict:
    """Do fp32 systems emit identical tokens for every case?"""
    fp32 = [r for r in reports if r["system"] in ("pytorch", "optimum-fp32", "edgecap-fp32")]
    checks = {}
    for case in fp32[0]["cases"] if fp32 else []:
        tokens = {r["system"]: r["cases"][case]["tokens"] for r in fp32}
        reference = tokens.get("pytorch")
        checks[case] = {name: t == reference for name, t in tokens.items()}
    return checks


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']} ({result['threads']} threads), {result['date']}, "
             f"model: {result['model']}, {result['new_tokens']} new tokens forced.", ""]
    lines.append("| case | system | p50 ms/img | p95 | p99 | img/s | encoder ms | decode ms/token "
                 "| vs PyTorch |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for case, systems in result["table"].items():
        for name, row in systems.items():
            ratio = f"{row['speedup_vs_pytorch']:.2f}x" if row["speedup_vs_pytorch"] else "-"
            lines.append(f"| {case} | {name} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
                         f"{row['p99_ms']:.0f} | {row['images_per_s']:.2f} | {row['encoder_ms']:.0f} | "
                         f"{row['decode_ms_per_token']:.1f} | {ratio} |")
    lines += ["", "| system | size on disk MB | peak RSS MB | cold start s |", "|---|---|---|---|"]
    for name, row in result["systems"].items():
        lines.append(f"| {name} | {row['size_bytes'] / 1e6:.0f} | {row['peak_rss_mb']:.0f} | "
                     f"{row['cold_start_s']:.1f} |")
    lines += ["", "Identical tokens to PyTorch (fp32 systems): " + json.dumps(result["equal_work"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(result["table"])
    systems = list(result["systems"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(systems))
    for i, name in enumerate(systems):
        values = [result["table"][c].get(name, {}).get("p50_ms", 0) for c in cases]
        axes[0].bar(np.arange(len(cases)) + i * width, values, width, label=name)
    axes[0].set_xticks(np.arange(len(cases)) + width * (len(systems) - 1) / 2, cases)
    axes[0].set_ylabel("p50 latency per image (ms)")
    axes[0].set_title("Latency per system and case (lower is better)")
    axes[0].legend(fontsize=8)
    for name in systems:
        for mode in ("greedy", "beam4"):
            points = sorted((result["table"][c][name]["p50_ms"], int(c.split(":")[1]))
                            for c in cases if c.startswith(mode + ":") and name in result["table"][c])
            if points:
                axes[1].plot([b for _, b in points], [v for v, _ in points], marker="o",
                             label=f"{name} {mode}")
    axes[1].set_xlabel("batch size")
    axes[1].set_ylabel("p50 latency per image (ms)")
    axes[1].set_title("Latency vs batch")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"edgecap benchmark, {result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache/edgecap/bench",
                        help="where models and exports are built and kept (outside the repo)")
    parser.add_argument("--systems", default="pytorch,optimum-fp32,optimum-int8,edgecap-fp32,edgecap-int8")
    parser.add_argument("--cases", default="greedy:1,beam4:1,greedy:8,beam4:8")
    parser.add_argument("--reps", type=int, default=30, help="max timed repetitions per case")
    parser.add_argument("--budget-s", type=float, default=25.0, help="time per case per system")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="", help="suffix for the result file names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("root").setLevel(logging.WARNING)

    started = time.perf_counter()
    paths = ensure_exports(args.work_dir)
    systems = args.systems.split(",")
    if any(s.startswith("optimum") for s in systems):
        paths.update(optimum_exports(paths["hf"], args.work_dir))
    names = [l.strip() for l in (FLICKR / "split_test.txt").read_text().splitlines() if l.strip()]
    images = [str(FLICKR / "images" / n) for n in names[:8]]
    model_for = {"pytorch": paths["hf"], "optimum-fp32": paths["hf"], "optimum-int8": paths["hf"],
                 "edgecap-fp32": paths["none"], "edgecap-int8": paths["int8-dynamic"]}
    reports = []
    for system in systems:
        if system.startswith("optimum") and system not in paths:
            continue
        log.info("running %s", system)
        report = run_worker(system, model_for[system], images, args.cases, args.reps,
                            args.budget_s, paths.get(system))
        if report:
            reports.append(report)
    date = datetime.date.today().isoformat()
    result = {
        "date": date, "machine": machine_name(), "threads": len(os.sched_getaffinity(0)),
        "model": "vit-base-16-224 + gpt2 (12 layers), random weights", "new_tokens": 20,
        "table": summarize(reports), "equal_work": equal_work(reports),
        "systems": {r["system"]: {k: r[k] for k in ("size_bytes", "peak_rss_mb", "cold_start_s")}
                    for r in reports},
        "wall_s": time.perf_counter() - started,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{date}-{result['machine']}{args.tag}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out_dir / f"{stem}.md").write_text(markdown(result))
    plot(result, args.out_dir / f"{stem}.png")
    print(markdown(result))
    print(f"wrote {args.out_dir / stem}.{{json,md,png}} in {result['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
