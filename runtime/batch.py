"""Batch captioning for the CLI: expand inputs, caption in batches, one output line per input.

Every input gets exactly one line, ``ok`` with its caption or ``error`` with the reason. With
``--out``, lines are appended to a JSONL file as they are produced; a re-run skips inputs already
recorded there, so an interrupted run resumes instead of starting over.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from .errors import EdgecapError, ImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE",
                        help="image files, folders (walked recursively) or quoted globs")
    parser.add_argument("--model", help="export directory (default: the embedded model)")
    parser.add_argument("--beams", type=int, dest="num_beams",
                        help="beam width; 1 is greedy (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, help="caption length cap in tokens")
    parser.add_argument("--no-repeat-ngram-size", type=int, help="block repeated n-grams of this size")
    parser.add_argument("--length-penalty", type=float, help="beam length penalty exponent")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per batch (default 8). With int8 models an image's caption can "
                             "depend on the rest of its batch (activations share one quantization "
                             "scale); 1 makes every caption independent of the others")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "tensorrt", "auto"])
    parser.add_argument("--json", action="store_true", help="print one JSON object per input")
    parser.add_argument("--out", type=Path,
                        help="append JSONL results here; a re-run skips inputs already in it")


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Files as given; folders walked recursively for image suffixes; globs expanded. Sorted
    within each pattern so runs are reproducible; duplicates kept once."""
    seen: dict[str, None] = {}
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir() and path.suffix.lower() not in IMAGE_SUFFIXES:
            found = sorted(
                str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif not path.exists() and glob.has_magic(pattern):
            found = sorted(glob.glob(pattern, recursive=True))
        else:
            found = [pattern]  # missing files still get an error line
        for item in found:
            seen.setdefault(item, None)
    return list(seen)


def completed_sources(out: Path) -> set[str]:
    """Inputs already recorded in ``out``; drops a torn last line left by a killed run."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    valid_end = raw.rfind(b"\n") + 1
    if valid_end != len(raw):
        with out.open("r+b") as handle:  # a half-written line from an interrupted run
            handle.truncate(valid_end)
    done = set()
    for line in raw[:valid_end].splitlines():
        try:
            done.add(json.loads(line)["source"])
        except (ValueError, KeyError, TypeError):
            continue
    return done


def run_caption(args: argparse.Namespace) -> int:
    from .captioner import Captioner

    sources = expand_inputs(args.inputs)
    skipped = 0
    if args.out:
        done = completed_sources(args.out)
        skipped = sum(1 for s in sources if s in done)
        sources = [s for s in sources if s not in done]
    captioner = Captioner(args.model, device=args.device, cpu_threads=args.threads)
    options = captioner.options(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                no_repeat_ngram_size=args.no_repeat_ngram_size,
                                length_penalty=args.length_penalty)
    sink = open(args.out, "a", encoding="utf-8") if args.out else None
    progress = Progress(len(sources), enabled=sink is not None or len(sources) > 1)
    failed = ok = 0
    try:
        for record in caption_records(captioner, sources, options, args.batch_size):
            ok += record["status"] == "ok"
            failed += record["status"] == "error"
            line = json.dumps(record, ensure_ascii=False)
            if sink:
                sink.write(line + "\n")
                sink.flush()
            if args.json:
                print(line, flush=True)
            elif not sink:
                text = record.get("caption") if record["status"] == "ok" else f"ERROR: {record['error']}"
                print(f"{record['source']}\t{text}" if len(sources) > 1 else text, flush=True)
            progress.update()
    finally:
        if sink:
            sink.flush()
            os.fsync(sink.fileno())
            sink.close()
        progress.close()
    summary = f"{ok} captioned, {failed} failed"
    if skipped:
        summary += f", {skipped} already in {args.out}"
    if sink is not None or failed or len(sources) > 1:
        print(f"edgecap: {summary}", file=sys.stderr)
    return 1 if failed else 0


def caption_records(captioner, sources: list[str], options, batch_size: int) -> Iterator[dict]:
    """Yield one record per source, in order; bad images become error records."""
    from .preprocess import load_image

    pending: list[tuple[str, object]] = []
    started = time.perf_counter()

    def flush() -> Iterator[dict]:
        nonlocal started
        if not pending:
            return
        names = [name for name, _ in pending]
        try:
            results = captioner.caption_loaded([img for _, img in pending], options, names, started)
        except EdgecapError as exc:
            results = [exc] * len(pending)
        for name, result in zip(names, results):
            if isinstance(result, Exception):
                yield {"source": name, "status": "error", "error": str(result)}
            else:
                yield {"source": name, "status": "ok", "caption": result.text,
                       "score": round(result.score, 4), "token_ids": result.token_ids,
                       "latency_ms": round(result.timings["total_ms"], 2)}
        pending.clear()
        started = time.perf_counter()

    for source in sources:
        try:
            pending.append((source, load_image(source)))
        except ImageError as exc:
            yield from flush()  # keep output in input order
            yield {"source": source, "status": "error", "error": exc.reason}
            continue
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


class Progress:
    """A dependency-free progress line on stderr (only when stderr is a terminal)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.count = total, 0
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.perf_counter()

    def update(self) -> None:
        self.count += 1
        if self.enabled:
            rate = self.count / max(1e-9, time.perf_counter() - self.started)
            print(f"\r{self.count}/{self.total} images  {rate:.1f} img/s", end="", file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)
