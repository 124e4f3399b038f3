"""Batch captioning for the CLI: expand inputs, caption in batches, one output line per input.

Every input gets exactly one line (``CaptionResult.to_record()``), ``ok`` with its caption or
``error`` with the reason. With
``--out``, lines are appended to a JSONL file as they are produced; a re-run skips inputs already
recorded there, so an interrupted run resumes instead of starting over.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..caption_io import JsonlWriter, completed_sources, expand_inputs, stdout_mode
from ..options import (
    DEFAULT_BATCH_SIZE,
    add_generation_arguments,
    add_runtime_arguments,
    generation_from_args,
    runtime_from_args,
)


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE",
                        help="image files, folders (walked recursively) or quoted globs")
    parser.add_argument("--model", help="export directory (default: the embedded model)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per input")
    parser.add_argument("--out", type=Path,
                        help="append JSONL results here; a re-run skips inputs already in it")
    add_generation_arguments(parser)
    add_runtime_arguments(parser, batch_size=DEFAULT_BATCH_SIZE)
    from .caption_ray import add_ray_arguments  # argparse only: ray is imported with --ray

    add_ray_arguments(parser)


def run_caption(args: argparse.Namespace) -> int:
    from ..captioner import Captioner

    if args.ray is not None or args.format != "jsonl" or args.actors is not None:
        from .caption_ray import run_ray_caption

        return run_ray_caption(args)
    sources = expand_inputs(args.inputs)
    skipped = 0
    if args.out:
        done = completed_sources(args.out)
        skipped = sum(1 for s in sources if s in done)
        sources = [s for s in sources if s not in done]
    captioner = Captioner(args.model, **runtime_from_args(args))
    generation = generation_from_args(args)
    captioner.options(**generation)  # a bad combination fails before any file is opened
    lines = JsonlWriter(args.out, stdout_mode(args.json, args.out is not None),
                        many=len(sources) > 1)
    progress = Progress(len(sources), enabled=args.out is not None or len(sources) > 1)
    counts = {"ok": 0, "error": 0}
    try:
        for outcome in captioner.caption_stream(sources, batch_size=args.batch_size, **generation):
            record = outcome.to_record()
            counts[record["status"]] += 1
            lines.write(record)
            progress.update()
    finally:
        lines.close()
        progress.close()
    summary = f"{counts['ok']} captioned, {counts['error']} failed"
    if skipped:
        summary += f", {skipped} already in {args.out}"
    if args.out is not None or counts["error"] or len(sources) > 1:
        print(f"edgecap: {summary}", file=sys.stderr)
    return 1 if counts["error"] else 0


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
