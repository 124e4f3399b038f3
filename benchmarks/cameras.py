"""Many cameras on one small box (not a test): N live 10 fps 640x480 streams captioned by one
``watch --config`` process (one shared model, its default inference lanes), by the same with one
lane (``--lanes 1``, one inference pipeline) and by N separate ``watch`` processes, at each count
in the same run, the systems alternating.

Each camera plays its own video at its own frame rate (``realtime``, the live-source policy:
newest frame only, stale frames dropped), and a tiny heartbeat makes every new frame worth a
caption (the sustained worst case, as in benchmarks.watch_stream). Reports total captions/s,
frame-to-caption latency p50/p95 over every caption, the share of frames dropped, the slowest
and fastest camera's captions/s (fairness) and the peak RSS of the processes (summed over the N
processes), plus ratios against the separate processes; the table goes to stderr, the JSON
(with what it was measured on) to stdout and ``--out``.

    python -m benchmarks.cameras [--counts 1 2 4 8] [--seconds 20] [--rounds 1] [--out r.json]
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
from .environment import environment
from .watch_stream import encode

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "data"
FPS = 10
HEARTBEAT_S = 0.001  # every new frame is worth a caption: the sustained worst case
# separate: what N plain `edgecap watch` processes do (each takes every core); separate-split:
# the same with the cores split between them (--threads cores/N), the tuned alternative.
MODES = ("shared", "shared-1-lane", "separate", "separate-split")


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
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        peak_kb += usage.ru_maxrss
    return peak_kb / 1024


def run_shared(paths: list[Path], folder: Path, extra: list[str], lanes: int | None
               ) -> tuple[list[list[dict]], float, str]:
    """One ``watch --config`` process; its records per camera, peak RSS and lanes line."""
    config = folder / "cameras.toml"
    config.write_text("".join(f'[[camera]]\nname = "cam{i}"\nsource = "{p}"\nrealtime = true\n'
                              f'heartbeat = {HEARTBEAT_S}\n\n'
                              for i, p in enumerate(paths)))
    tag = f"{len(paths)}-{lanes or 'default'}"
    out, log = folder / f"shared-{tag}.jsonl", folder / f"shared-{tag}.log"
    out.unlink(missing_ok=True)  # watch appends: a previous round's records must not count
    command = [sys.executable, "-m", "edgecap.cli", "watch", "--config", str(config),
               "--out", str(out), *extra, *(["--lanes", str(lanes)] if lanes else [])]
    with log.open("w") as stderr:
        rss = wait_all([subprocess.Popen(command, stderr=stderr)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    lanes_line = next((line for line in log.read_text().splitlines() if "lane 0:" in line), "")
    return ([[r for r in records if r["camera"] == f"cam{i}"] for i in range(len(paths))], rss,
            lanes_line.removeprefix("edgecap: "))


def run_separate(paths: list[Path], folder: Path, extra: list[str]
                 ) -> tuple[list[list[dict]], float, str]:
    """N ``watch`` processes, one per camera; their records, summed peak RSS."""
    outs = [folder / f"separate-{len(paths)}-{i}.jsonl" for i in range(len(paths))]
    for out in outs:
        out.unlink(missing_ok=True)
    processes = [subprocess.Popen([sys.executable, "-m", "edgecap.cli", "watch", str(p),
                                   "--realtime", "--heartbeat", str(HEARTBEAT_S),
                                   "--out", str(o), *extra],
                                  stderr=subprocess.DEVNULL) for p, o in zip(paths, outs)]
    rss = wait_all(processes)
    return [[json.loads(line) for line in o.read_text().splitlines()] for o in outs], rss, ""


def summary(per_camera: list[list[dict]], rss: float, seconds: float) -> dict:
    """What one run of one system measured."""
    records = [r for camera in per_camera for r in camera]
    latency = [r["latency_ms"] for r in records] or [float("nan")]
    rates = [len(camera) / seconds for camera in per_camera]
    return {"captions_per_s": len(records) / seconds,
            "frame_to_caption_ms_p50": float(np.percentile(latency, 50)),
            "frame_to_caption_ms_p95": float(np.percentile(latency, 95)),
            "dropped_share": sum(r["dropped"] for r in records)
            / (seconds * FPS * len(per_camera)),
            "camera_captions_per_s_min": min(rates), "camera_captions_per_s_max": max(rates),
            "peak_rss_mb": rss}


def median_of(runs: list[dict]) -> dict:
    """Each measure's median over the rounds (one run per round)."""
    return {key: float(np.median([run[key] for run in runs])) for key in runs[0]}


def table(report: dict, modes: tuple[str, ...]) -> str:
    """A Markdown table: one row per camera count, cells system by system, and the shared
    watcher's captions/s and RSS against each separate-process baseline."""
    cells = " / ".join(modes)
    baselines = [m for m in ("separate", "separate-split") if m in modes and "shared" in modes]
    ratios = "".join(f" shared/{b} captions/s, RSS |" for b in baselines)
    lines = [f"| cameras | captions/s ({cells}) | p50 ms | p95 ms | dropped | slowest-fastest "
             f"camera /s | peak RSS MB |{ratios}", "|---" * (7 + len(baselines)) + "|"]
    for count, row in report.items():
        def cell(key: str, form: str) -> str:
            return " / ".join(format(row[m][key], form) for m in modes)

        spread = " / ".join(f"{row[m]['camera_captions_per_s_min']:.1f}-"
                            f"{row[m]['camera_captions_per_s_max']:.1f}" for m in modes)
        against = "".join(
            f" {row['shared']['captions_per_s'] / row[b]['captions_per_s']:.2f}x, "
            f"{row['shared']['peak_rss_mb'] / row[b]['peak_rss_mb']:.2f} |" for b in baselines)
        lines.append(f"| {count} | {cell('captions_per_s', '.1f')} | "
                     f"{cell('frame_to_caption_ms_p50', '.0f')} | "
                     f"{cell('frame_to_caption_ms_p95', '.0f')} | {cell('dropped_share', '.0%')} | "
                     f"{spread} | {cell('peak_rss_mb', '.0f')} |{against}")
    return "\n".join(lines)


def measure(paths: list[Path], folder: Path, extra: list[str], mode: str, seconds: float
            ) -> tuple[dict, str]:
    if mode == "separate":
        per_camera, rss, lanes = run_separate(paths, folder, extra)
    elif mode == "separate-split":
        threads = max(1, len(os.sched_getaffinity(0)) // len(paths))
        per_camera, rss, lanes = run_separate(paths, folder, [*extra, "--threads", str(threads)])
    else:
        per_camera, rss, lanes = run_shared(paths, folder, extra,
                                            1 if mode == "shared-1-lane" else None)
    return summary(per_camera, rss, seconds), lanes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="export directory (default: embedded model)")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each stream")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of every system per count (medians; the order alternates)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    extra = ["--model", args.model] if args.model else []
    modes = tuple(args.modes)
    report, lanes_used = {}, {}
    began, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        paths = videos(Path(tmp), max(args.counts), args.seconds)
        for count in args.counts:
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for round_index in range(args.rounds):
                order = modes if round_index % 2 == 0 else modes[::-1]
                for mode in order:
                    result, lanes = measure(paths[:count], Path(tmp), extra, mode, args.seconds)
                    runs[mode].append(result)
                    lanes_used.setdefault(str(count), {})[mode] = lanes or None
            report[str(count)] = {mode: median_of(results) for mode, results in runs.items()}
            print(f"{count} cameras: " + "; ".join(
                f"{mode} {report[str(count)][mode]['captions_per_s']:.1f}/s "
                f"{report[str(count)][mode]['peak_rss_mb']:.0f} MB" for mode in modes),
                file=sys.stderr)
    markdown = table(report, modes)
    print(markdown, file=sys.stderr)
    emit_report({"environment": environment(len(os.sched_getaffinity(0))),
                 "settings": {"fps": FPS, "seconds": args.seconds, "rounds": args.rounds,
                              "model": args.model or "default", "modes": list(modes),
                              "wall_s": round(time.time() - began, 1),
                              # Other work on the machine skews every system; say how much.
                              "load_average_before": load_before,
                              "load_average_after": os.getloadavg()},
                 "lanes": lanes_used, "results": report, "table": markdown}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
