"""Images/s of `edgecap caption` against `edgecap caption --ray` with 1 and 2 actors, one run.

All three caption the same images with the same model on the same CPUs, in interleaved rounds
(local, Ray 1 actor, Ray N actors, then again), so the shared machine's swings hit all alike:

- ``local``: ``edgecap caption --threads CPUS`` in its own process (one ``Captioner``).
- ``ray-1``: one actor that reserves all CPUs and runs that many threads.
- ``ray-N``: N actors of one CPU (and one thread) each.

Each system captions a small and a large set in every round; wall time runs from the call to the
last record, model loading included (the local Captioner, the actors' Captioners). The model
T(n) = startup + n / rate is solved from the two: ``rate`` is the marginal images/s once running
(startup cancels out), ``startup`` the fixed cost of a run. Ray's overhead per image is
1/rate(ray-1) - 1/rate(local), at equal threads. Starting the local Ray cluster is timed once.

    python -m benchmarks.ray_throughput [--model DIR] [--small 32] [--large 288] [--rounds 2]
        [--cpus 2] [--out-dir benchmarks/results] [--tag ray-amd-epyc-2core]

Images: the Flickr8k test split when ../shared/data/flickr8k is there, else tests/data's photos.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr8k"


def benchmark_images(count: int) -> list[str]:
    """``count`` image paths: Flickr8k test images, else the shipped photos (repeated)."""
    if (FLICKR / "split_test.txt").is_file():
        names = (FLICKR / "split_test.txt").read_text().split()
        paths = [str(FLICKR / "images" / n) for n in names]
    else:
        paths = sorted(str(p) for p in (REPO / "tests" / "data").glob("*.jpg"))
    return [paths[i % len(paths)] for i in range(count)]


def timed_local(images: list[str], model: str | None, cpus: int, batch_size: int) -> tuple:
    """`edgecap caption` itself, in its own process (not inside this Ray driver, whose
    background threads would share its cores); Python's start counts as startup."""
    command = [sys.executable, "-m", "edgecap.cli", "caption", *images, "--json",
               "--threads", str(cpus), "--batch-size", str(batch_size)]
    if model:
        command += ["--model", model]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=3600)
    elapsed = time.perf_counter() - began
    records = [json.loads(line) for line in done.stdout.splitlines()]
    return elapsed, {r["source"]: r.get("generated_text") for r in records}


def timed_ray(images: list[str], model: str | None, actors: int, cpus_per_actor: int,
              batch_size: int) -> tuple:
    """`edgecap caption --ray`'s path: caption_dataset, records streamed to the driver."""
    from edgecap.distributed import caption_dataset, paths_dataset

    began = time.perf_counter()
    dataset = caption_dataset(paths_dataset(images), model, batch_size=batch_size,
                              actors=actors, cpus_per_actor=cpus_per_actor)
    texts = {row["source"]: row["generated_text"]
             for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None)
             for row in batch.to_pylist()}
    return time.perf_counter() - began, texts


def run(args: argparse.Namespace) -> dict:
    import ray

    images = benchmark_images(args.small + args.large)
    small, large = images[: args.small], images[args.small:]
    for path in images:  # warm the page cache: every system then reads from memory
        Path(path).read_bytes()
    began = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cluster_start_s = time.perf_counter() - began
    systems = {
        "local": lambda batch: timed_local(batch, args.model, args.cpus, args.batch_size),
        "ray-1": lambda batch: timed_ray(batch, args.model, 1, args.cpus, args.batch_size),
        f"ray-{args.cpus}": lambda batch: timed_ray(batch, args.model, args.cpus, 1,
                                                    args.batch_size),
    }
    for measure in systems.values():  # warm-up: Ray's worker processes, imports, page cache
        measure(small)
    rounds: dict[str, list[dict]] = {name: [] for name in systems}
    for round_index in range(args.rounds):
        for name, measure in systems.items():
            (small_s, small_texts), (large_s, large_texts) = measure(small), measure(large)
            rounds[name].append(fit(len(small), small_s, len(large), large_s,
                                    {**small_texts, **large_texts}))
            print(f"round {round_index + 1} {name}: {rounds[name][-1]['rate_img_s']:.2f} img/s, "
                  f"startup {rounds[name][-1]['startup_s']:.1f} s", file=sys.stderr)
    ray.shutdown()
    return report(args, len(images), cluster_start_s, rounds)


def fit(n_small: int, small_s: float, n_large: int, large_s: float, texts: dict) -> dict:
    """T(n) = startup + n / rate through the two runs."""
    rate = (n_large - n_small) / (large_s - small_s)
    return {"small_s": small_s, "large_s": large_s, "rate_img_s": rate,
            "startup_s": small_s - n_small / rate, "wall_img_s": n_large / large_s,
            "texts": texts}


def report(args: argparse.Namespace, image_count: int, cluster_start_s: float,
           rounds: dict[str, list[dict]]) -> dict:
    """Medians per system, Ray's overhead per image, and whether all captions agreed."""
    table = {}
    for name, results in rounds.items():
        table[name] = {key: statistics.median(r[key] for r in results)
                       for key in ("rate_img_s", "startup_s", "wall_img_s", "large_s")}
        table[name]["per_round_rate_img_s"] = [round(r["rate_img_s"], 3) for r in results]
    reference = rounds["local"][0]["texts"]
    equal = all(r["texts"] == reference for results in rounds.values() for r in results)
    return {
        "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "cpus": args.cpus, "model": args.model or "embedded default model",
        "small": args.small, "large": args.large, "rounds": args.rounds,
        "batch_size": args.batch_size, "image_source": "flickr8k test" if
        (FLICKR / "split_test.txt").is_file() else "tests/data",
        "images": image_count, "cluster_start_s": cluster_start_s, "systems": table,
        "equal_captions": equal,
        "ray_overhead_ms_per_image": 1e3 * (1 / table["ray-1"]["rate_img_s"]
                                            - 1 / table["local"]["rate_img_s"]),
        "ray_version": __import__("ray").__version__,
    }


def markdown(result: dict) -> str:
    lines = [
        f"# `caption` vs `caption --ray` ({result['date']}, {result['cpus']} CPUs)", "",
        (f"`python -m benchmarks.ray_throughput --small {result['small']} --large "
        f"{result['large']} --rounds {result['rounds']}`: {result['image_source']} images, "
        f"{result['model']}, its default decoding, batch {result['batch_size']}, "
        f"Ray {result['ray_version']}. "
        f"Medians of {result['rounds']} interleaved rounds. Starting the local Ray cluster: "
        f"{result['cluster_start_s']:.1f} s (once, not in the table)."), "",
        ("| system | img/s once running | startup s | img/s over the large set (startup in) "
         "| rate per round |"),
        "|---|---|---|---|---|",
    ]
    for name, row in result["systems"].items():
        lines.append(f"| {name} | {row['rate_img_s']:.2f} | {row['startup_s']:.1f} | "
                     f"{row['wall_img_s']:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in row['per_round_rate_img_s'])} |")
    lines += ["", (f"Ray's overhead per image (ray-1 vs local, same threads): "
                   f"{result['ray_overhead_ms_per_image']:.1f} ms."),
              f"Captions identical across systems and rounds: {result['equal_captions']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="export directory (default: the embedded model)")
    parser.add_argument("--small", type=int, default=32, help="images in the small run")
    parser.add_argument("--large", type=int, default=288, help="images in the large run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default="ray-amd-epyc-2core")
    args = parser.parse_args(argv)
    result = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{result['date']}-{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
