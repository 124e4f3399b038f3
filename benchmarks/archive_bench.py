"""Caption archive benchmark: insert rate, size and search latency at a million captions.

Synthetic captions from a plausible captioning vocabulary (Flickr8k-like sentences), four
cameras, spread over 30 days. Not a test: run it by hand, e.g.

    nice -n 10 python benchmarks/archive_bench.py --rows 1000000 --out /tmp/archive_bench.db
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import time
from pathlib import Path

from edgecap.archive import Archive, events

SUBJECTS = ["man", "woman", "person", "boy", "girl", "child", "dog", "cat", "group of people",
            "couple", "delivery driver", "cyclist", "car", "truck", "van", "bus", "bird",
            "man in a hat", "woman with an umbrella", "two dogs", "police officer", "jogger"]
COLORS = ["red", "blue", "white", "black", "green", "yellow", "brown", "gray", "orange"]
VERBS = ["standing", "walking", "running", "sitting", "parked", "waiting", "looking",
         "riding a bike", "carrying a box", "holding a bag", "talking on a phone", "playing",
         "driving", "crossing"]
PLACES = ["at the door", "on the porch", "in the driveway", "on the street", "near the gate",
          "on the sidewalk", "in the yard", "in the garage", "by the window", "on the grass",
          "in front of a house", "next to a fence", "in the snow", "in the rain", "at night"]
CAMERAS = ["front", "back", "garage", "street"]
T0 = dt.datetime(2026, 10, 26, tzinfo=dt.timezone.utc)
SPAN_S = 30 * 86400


def caption(rng: random.Random) -> str:
    subject = rng.choice(SUBJECTS)
    if rng.random() < 0.5:
        subject = f"{rng.choice(COLORS)} {subject}" if " " not in subject else subject
    article = "an" if subject[0] in "aeiou" else "a"
    text = f"{article} {subject} {rng.choice(VERBS)} {rng.choice(PLACES)}"
    if rng.random() < 0.3:
        text += f" with a {rng.choice(COLORS)} {rng.choice(['car', 'bag', 'jacket', 'dog'])}"
    return text


def records(n: int, seed: int = 0, start_s: float = 0.0, span_s: float = SPAN_S):
    rng = random.Random(seed)
    frames = dict.fromkeys(CAMERAS, 0)
    for i in range(n):
        camera = CAMERAS[i % len(CAMERAS)]
        frames[camera] += 1
        wall = T0 + dt.timedelta(seconds=start_s + span_s * i / n)
        yield {"camera": camera, "stream_time": frames[camera] * 2.6, "frame_index": frames[camera],
               "wall_time": wall.isoformat(timespec="milliseconds"), "generated_text": caption(rng),
               "score": -rng.random(), "latency_ms": 80 + 40 * rng.random(), "snapshot": None}


def build(path: Path, rows: int, batch: int) -> dict:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    started = time.perf_counter()
    with Archive.open(path) as archive:
        chunk: list[dict] = []
        for record in records(rows):
            chunk.append(record)
            if len(chunk) == batch:
                archive.add_many(chunk)
                chunk = []
        if chunk:
            archive.add_many(chunk)
        bulk_s = time.perf_counter() - started
        # One row per transaction, as a watch loop adds them, after the bulk rows in time.
        single = list(records(2000, seed=1, start_s=SPAN_S, span_s=3600))
        started = time.perf_counter()
        for record in single:
            archive.add(record)
        single_s = time.perf_counter() - started
        archive._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return {"rows": rows, "bulk_rows_per_s": rows / bulk_s, "bulk_s": bulk_s,
            "single_rows_per_s": len(single) / single_s,
            "db_mb": path.stat().st_size / 2**20}


def percentiles(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    return {"p50_ms": statistics.median(ordered),
            "p95_ms": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "n": len(ordered)}


QUERIES = {
    "word": [("dog", {}), ("person", {}), ("truck", {}), ("umbrella", {}), ("door", {}),
             ("jogger", {}), ("cyclist", {}), ("man", {}), ("bus", {}), ("bird", {})],
    "phrase": [('"red car"', {}), ('"at the door"', {}), ('"delivery driver"', {}),
               ('"man walking"', {}), ('"police officer"', {})],
    "boolean": [("dog OR cat", {}), ("person NOT dog", {}), ("walk*", {})],
    "camera": [("person door", {"camera": "front"}), ("truck", {"camera": "street"})],
    "time_2h": [("person", {"since": SPAN_S - 7200}), ("dog", {"since": SPAN_S - 7200}),
                ('"at the door"', {"since": SPAN_S - 7200})],
    "time_1d": [("person door", {"since": SPAN_S - 86400}), ("truck", {"since": SPAN_S - 86400}),
                ("dog", {"since": SPAN_S - 86400, "camera": "front"})],
}


def time_queries(path: Path, repeats: int) -> dict:
    results = {}
    with Archive.open(path, readonly=True) as archive:
        for kind, queries in QUERIES.items():
            samples = []
            for query, options in queries:
                options = {k: (T0 + dt.timedelta(seconds=v) if k == "since" else v)
                           for k, v in options.items()}
                archive.search(query, **options)  # warm-up: pages into the OS cache
                for _ in range(repeats):
                    started = time.perf_counter()
                    events(archive.search(query, **options))
                    samples.append((time.perf_counter() - started) * 1e3)
            results[kind] = percentiles(samples)
    return results


def time_prune(path: Path) -> dict:
    with Archive.open(path) as archive:
        before = archive.count()
        started = time.perf_counter()
        stats = archive.prune(keep_days=29, now=T0 + dt.timedelta(seconds=SPAN_S))
        elapsed = time.perf_counter() - started
    return {"rows_before": before, "rows_deleted": stats.rows_deleted, "prune_s": elapsed,
            "rows_per_s": stats.rows_deleted / elapsed if elapsed else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000, help="rows per add_many")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per query")
    parser.add_argument("--out", type=Path, default=Path("/tmp/archive_bench.db"))
    parser.add_argument("--reuse", action="store_true", help="search an existing --out")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    report = {"sqlite": __import__("sqlite3").sqlite_version, "cpus": os.cpu_count()}
    if not args.reuse:
        report["build"] = build(args.out, args.rows, args.batch)
        print(json.dumps(report["build"]), flush=True)
    report["search"] = time_queries(args.out, args.repeats)
    print(json.dumps(report["search"]), flush=True)
    report["prune"] = time_prune(args.out)
    print(json.dumps(report["prune"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
