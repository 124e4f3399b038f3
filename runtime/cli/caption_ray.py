"""``edgecap caption --ray``: the command's flags, its resumable outputs (JSONL or Parquet) and
its run on a cluster, over the library in ``edgecap.distributed`` (docs/distributed.md).

``ray`` (the ``[ray]`` extra) is imported only when ``--ray`` runs, so registering the flags costs
nothing."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..caption_io import JsonlWriter, completed_sources, expand_inputs, stdout_mode
from ..distributed import caption_dataset, connect, paths_dataset, row_to_record
from ..errors import EdgecapError
from ..options import check_generation, generation_from_args

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("edgecap")


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``caption``'s cluster flags (argparse only: ray is imported when --ray is used)."""
    group = parser.add_argument_group("Ray cluster (needs the [ray] extra; docs/distributed.md)")
    group.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                       help="caption on a Ray cluster. `auto` (--ray alone) joins RAY_ADDRESS or "
                       "the cluster `ray start` runs here, else starts a local one; `local` "
                       "always starts one; or HOST:PORT, ray://HOST:PORT. Each actor reserves "
                       "--threads CPUs (default 1) and runs that many threads")
    group.add_argument("--actors", type=actor_range, metavar="MIN[:MAX]",
                       help="with --ray: actor pool size (default 1:as many as the CPUs allow)")
    group.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl",
                       help="with --ray: --out is a JSONL file (default) or a folder of Parquet "
                       "files written by the workers")


def actor_range(text: str) -> tuple[int, int | None]:
    """``N`` or ``MIN:MAX`` (``MIN:`` for no upper bound) as a pool size."""
    low, _, high = text.partition(":") if ":" in text else (text, ":", text)
    try:
        bounds = (int(low), int(high) if high else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}") from None
    if bounds[0] < 1 or (bounds[1] is not None and bounds[1] < bounds[0]):
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX (got {text})")
    return bounds


def completed_parquet(out: Path) -> set[str]:
    """Sources already in a Parquet output folder. A file that a killed run left half-written
    (no footer) holds no complete record: it is removed, and its inputs run again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not out.exists():
        return set()
    if not out.is_dir():
        raise EdgecapError(f"{out}: --format parquet writes a folder of files, but this is a file")
    done: set[str] = set()
    for path in sorted(out.glob("*.parquet")):
        try:
            done.update(pq.read_table(path, columns=["source"]).column("source").to_pylist())
        except (pa.ArrowInvalid, OSError) as exc:
            log.warning("%s: incomplete Parquet file from an interrupted run, removed (%s)",
                        path, exc)
            path.unlink()
    return done


def write_lines(dataset: ray.data.Dataset, args: argparse.Namespace, many: bool
                ) -> dict[str, int]:
    """Stream records to --out (JSONL, appended and flushed per line, as ``caption`` does) and/or
    stdout. Only finished batches reach the driver, so a retried batch is written once."""
    counts = {"ok": 0, "error": 0}
    with JsonlWriter(args.out, stdout_mode(args.json, args.out is not None), many) as lines:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                record = row_to_record(row)
                counts[record["status"]] += 1
                lines.write(record)
    return counts


def write_parquet(dataset: ray.data.Dataset, out: Path) -> dict[str, int]:
    """Workers write Parquet files into ``out`` (no records pass through the driver); returns
    the counts read back from the files this run added."""
    import pyarrow.parquet as pq

    before = set(out.glob("*.parquet")) if out.is_dir() else set()
    dataset.write_parquet(str(out))
    added = sorted(set(out.glob("*.parquet")) - before)
    statuses = [s for path in added
                for s in pq.read_table(path, columns=["status"]).column("status").to_pylist()]
    return {"ok": statuses.count("ok"), "error": statuses.count("error")}


def run_ray_caption(args: argparse.Namespace) -> int:
    """``edgecap caption --ray``: same inputs, options and records as ``caption``, on Ray."""
    problem = _usage_problem(args)
    if problem:
        print(f"edgecap: error: {problem}", file=sys.stderr)
        return 2
    import ray  # noqa: F401 - only here: without the [ray] extra the CLI names it in one line

    generation = check_generation(generation_from_args(args))
    check_model_here(args.model, args.device, generation)
    if args.out is None:
        done: set[str] = set()
    else:
        done = (completed_parquet(args.out) if args.format == "parquet"
                else completed_sources(args.out))
    sources = expand_inputs(args.inputs)
    todo = [s for s in sources if s not in done]
    counts = (_caption_on_ray(todo, args, generation, many=len(sources) > 1) if todo
              else {"ok": 0, "error": 0})
    _summarize(counts, len(sources) - len(todo), args)
    return 1 if counts["error"] else 0


def check_model_here(model: str | None, device: str, generation: dict[str, Any]) -> None:
    """Load the model once on the driver, when it can see it, so a bad model or a combination
    of options it rejects is one line here instead of every actor failing on the cluster. A path
    only the workers have is left to them."""
    if model is not None and not Path(model).is_dir():
        log.warning("%s is not a folder here; the workers must have it", model)
        return
    from ..captioner import Captioner

    Captioner(model, device=device, cpu_threads=1).options(**generation)


def _caption_on_ray(sources: list[str], args: argparse.Namespace, generation: dict[str, Any],
                    many: bool) -> dict[str, int]:
    """Connect, caption ``sources`` into --out (or stdout), disconnect; the outcome counts."""
    import ray
    from ray.data import DataContext

    started = connect(args.ray)
    try:
        DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        dataset = caption_dataset(paths_dataset(sources), args.model, batch_size=args.batch_size,
                                  actors=args.actors or (1, None), device=args.device,
                                  cpus_per_actor=args.threads or 1,
                                  exact_preprocessing=args.exact_preprocessing, **generation)
        if args.format == "parquet":
            return write_parquet(dataset, args.out)
        return write_lines(dataset, args, many=many)
    except ray.exceptions.RayError as exc:
        raise EdgecapError(f"the Ray run failed: {_first_line(exc)}") from None
    finally:
        if started:
            ray.shutdown()


def _usage_problem(args: argparse.Namespace) -> str | None:
    """Flag combinations that only make sense with --ray, or the address typo argparse allows."""
    if args.ray is None:
        return "--format parquet and --actors need --ray"
    if os.path.exists(args.ray):  # `--ray photos/` took the first input as the address
        return (f"--ray took {args.ray!r} as the cluster address; put --ray after the inputs "
                "or write --ray auto")
    if args.format == "parquet" and not args.out:
        return "--format parquet needs --out FOLDER"
    if args.precision != "fp32" or args.engine_cache or args.io_binding != "auto":
        # Ray's actors reserve CPUs, not GPUs: these settings would be silently ignored there.
        return "--precision, --engine-cache and --io-binding are for local runs, not --ray"
    return None


def _summarize(counts: dict[str, int], skipped: int, args: argparse.Namespace) -> None:
    summary = f"{counts['ok']} captioned, {counts['error']} failed"
    if skipped:
        summary += f", {skipped} already in {args.out}"
    print(f"edgecap: {summary}", file=sys.stderr)


def _first_line(exc: BaseException) -> str:
    """Ray's errors carry remote tracebacks: the user needs the cause's one line."""
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__
