"""``python -m benchmarks``: edgecap vs PyTorch generate() vs optimum, same weights, one run.

Each system runs in its own worker process (so its peak RSS and cold start are its own). The
workers are started one at a time, then take turns in short time slices for every case, so the
machine's drifts in speed (it is shared) hit every system alike; ratios are against PyTorch
measured in the same run.
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
import tempfile
import time
from pathlib import Path

import numpy as np

from .environment import environment
from .models import ensure_exports
from .worker import NEW_TOKENS

HERE = Path(__file__).resolve().parent
FLICKR = HERE.parents[0].parent / "shared" / "data" / "flickr8k"
PHOTOS = HERE.parents[0] / "tests" / "data"


def benchmark_images(count: int) -> list[str]:
    """The first Flickr8k test images (the published runs), or the photos that ship in
    tests/data in a clone without ../shared."""
    split = FLICKR / "split_test.txt"
    if split.is_file():
        names = [l.strip() for l in split.read_text().splitlines() if l.strip()]
        return [str(FLICKR / "images" / n) for n in names[:count]]
    return [str(p) for p in sorted(PHOTOS.glob("*.jpg"))[:count]]
log = logging.getLogger("edgecap.bench")
# Each system, and the edgecap export mode it runs (None: it loads the Hugging Face model).
# edgecap-int8 is the batch-invariant int8-dynamic format, edgecap-int8-block its 8-bit block
# decoder variant (docs/quantization.md).
SYSTEM_MODES = {"pytorch": None, "optimum-fp32": None, "optimum-int8": None, "edgecap-fp32": "none",
                "edgecap-int8": "int8-dynamic", "edgecap-int8-block": "int8-block",
                "edgecap-int4": "int4"}
DEFAULT_SYSTEMS = ",".join(SYSTEM_MODES)


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


class Worker:
    """One system's worker process, driven over stdin/stdout with one JSON object per line."""

    def __init__(self, system: str, model_dir: Path, images: list[str], optimum_dir: Path | None):
        command = [sys.executable, "-m", "benchmarks.worker", "--system", system,
                   "--model-dir", str(model_dir), "--images", *images,
                   "--launched-at", str(time.time())]
        if optimum_dir:
            command += ["--optimum-dir", str(optimum_dir)]
        self.system = system
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(command, cwd=HERE.parent, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.report = {"system": system, **self._reply(), "cases": {}}

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"{self.system} worker died:\n{self.log.read()[-3000:]}")
        return json.loads(line)

    def ask(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def add(self, case: str, result: dict) -> None:
        data = self.report["cases"].setdefault(case, {"batch": result["batch"], "beams": result["beams"],
                                                      "latency_ms": [], "encoder": [], "decode": []})
        data["latency_ms"] += result["latency_ms"]
        data["encoder"] += result["encoder_ms"]
        data["decode"] += result["decode_ms"]
        data["tokens"] = result["tokens"]

    def reps(self, case: str) -> int:
        return len(self.report["cases"].get(case, {}).get("latency_ms", []))

    def finish(self) -> dict:
        self.report.update(self.ask(op="quit"))
        self.proc.wait(timeout=60)
        for data in self.report["cases"].values():
            data["encoder_ms"] = float(np.median(data.pop("encoder")))
            data["decode_ms_per_token"] = float(np.median(data.pop("decode"))) / NEW_TOKENS
        return self.report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def run_interleaved(workers: list[Worker], cases: list[str], reps: int, budget_s: float,
                    slice_s: float, settle_s: float) -> None:
    """Per case: warm every system up, then give each a time slice in turn until every system has
    ``reps`` timed runs or the case's budget (``budget_s`` per system) is spent (at least 3 runs
    each). Slices interleave, so drifts in machine speed hit all systems alike; a short pause
    after each slice lets the previous system's threads go idle before the next one starts."""
    for case in cases:
        for worker in workers:
            worker.ask(op="warm", case=case)
            time.sleep(settle_s)
        deadline = time.perf_counter() + budget_s * len(workers)
        while True:
            pending = [w for w in workers if w.reps(case) < reps]
            if not pending or (time.perf_counter() > deadline and all(w.reps(case) >= 3 for w in pending)):
                break
            for worker in pending:
                worker.add(case, worker.ask(op="run", case=case, slice_s=slice_s,
                                            max_reps=reps - worker.reps(case)))
                time.sleep(settle_s)
        for worker in workers:
            latencies = worker.report["cases"][case]["latency_ms"]
            log.info("%s %s: p50 %.0f ms (%d reps)", worker.system, case, np.median(latencies),
                     len(latencies))


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
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(systems):  # one colour per system (as in the bars), one line style per mode
        for mode, style in (("greedy", "-"), ("beam4", "--")):
            points = sorted((int(c.split(":")[1]), result["table"][c][name]["p50_ms"])
                            for c in cases if c.startswith(mode + ":") and name in result["table"][c])
            if points:
                axes[1].plot([b for b, _ in points], [v for _, v in points], style, marker="o",
                             color=colors[i % len(colors)], label=f"{name} {mode}")
    axes[1].set_xlabel("batch size")
    axes[1].set_yscale("log")  # edgecap's lines sit an order of magnitude below the others
    axes[1].set_ylabel("p50 latency per image (ms, log scale)")
    axes[1].set_title("Latency vs batch (solid: greedy, dashed: beam 4)")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"edgecap benchmark, {result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache/edgecap/bench",
                        help="where models and exports are built and kept (outside the repo)")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS)
    parser.add_argument("--cases", default="greedy:1,beam4:1,greedy:8,beam4:8")
    parser.add_argument("--reps", type=int, default=30, help="max timed repetitions per case")
    parser.add_argument("--budget-s", type=float, default=20.0,
                        help="timed seconds per case per system (at least 3 runs each)")
    parser.add_argument("--slice-s", type=float, default=2.0,
                        help="seconds a system runs before the next one takes over")
    parser.add_argument("--settle-s", type=float, default=0.3,
                        help="idle pause between slices (lets thread pools go to sleep)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="", help="suffix for the result file names")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run: a 2+2-layer, 32-wide model of the same layout, kept in "
                             "WORK_DIR/tiny (checks the whole pipeline and equal tokens in about a "
                             "minute; its timings mean nothing)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    logging.getLogger("root").setLevel(logging.WARNING)  # quantizers' chatter goes to the root logger
    log.setLevel(logging.INFO)  # progress lines, which would otherwise inherit the root's WARNING

    started = time.perf_counter()
    systems = args.systems.split(",")
    unknown = sorted(set(systems) - set(SYSTEM_MODES))
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEM_MODES)}")
    work_dir = args.work_dir / "tiny" if args.tiny else args.work_dir
    modes = tuple(dict.fromkeys(["none"] + [SYSTEM_MODES[s] for s in systems if SYSTEM_MODES[s]]))
    paths = ensure_exports(work_dir, modes, tiny=args.tiny)
    if any(s.startswith("optimum") for s in systems):
        paths.update(optimum_exports(paths["hf"], work_dir))
    images = benchmark_images(8)
    model_for = {s: paths[SYSTEM_MODES[s]] if s.startswith("edgecap") else paths["hf"] for s in systems}
    workers: list[Worker] = []
    try:
        for system in systems:  # started one at a time: cold starts are not contended
            if system.startswith("optimum") and system not in paths:
                continue
            log.info("starting %s", system)
            workers.append(Worker(system, model_for[system], images, paths.get(system)))
        run_interleaved(workers, args.cases.split(","), args.reps, args.budget_s, args.slice_s,
                        args.settle_s)
        reports = [worker.finish() for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    date = datetime.date.today().isoformat()
    result = {
        "date": date, "machine": machine_name(), "threads": len(os.sched_getaffinity(0)),
        "model": ("tiny smoke model (vit 2 layers + gpt2 2 layers, 32 wide), random weights"
                  if args.tiny else "vit-base-16-224 + gpt2 (12 layers), random weights"),
        "new_tokens": NEW_TOKENS,
        "table": summarize(reports), "equal_work": equal_work(reports),
        "systems": {r["system"]: {k: r[k] for k in ("size_bytes", "peak_rss_mb", "cold_start_s")}
                    for r in reports},
        "wall_s": time.perf_counter() - started,
        "environment": environment(len(os.sched_getaffinity(0))),
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
