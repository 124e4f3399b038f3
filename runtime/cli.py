"""``edgecap`` command line: a thin layer over ``Captioner``.

Runtime commands live here. Toolchain commands (export, train, eval, ...) are registered by
``edgecap.export.commands`` when that package is importable; their heavy imports (torch,
transformers) happen only when one of them runs, so ``edgecap caption`` never loads them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .batch import add_caption_arguments, run_caption
from .errors import EdgecapError

log = logging.getLogger("edgecap")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecap",
        description="Caption images on edge devices with ONNX Runtime (no PyTorch at serve time).",
        epilog="Run `edgecap COMMAND --help` for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    caption = commands.add_parser(
        "caption", help="caption images, folders or globs",
        description="Caption images with an exported model (default: the embedded model). "
        "Prints one line per input; with --json, one JSON object per line.",
    )
    add_caption_arguments(caption)
    caption.set_defaults(handler=run_caption)
    watch = commands.add_parser(
        "watch", help="caption a video file, stream, camera or drop folder (needs [video])",
        description="Caption live video in real time: SOURCE is a video file, an rtsp:// or "
        "http(s):// stream, a camera (/dev/video0) or a folder that receives image files. The "
        "reader keeps only the newest frame; stale frames are dropped and counted. A scene gate "
        "skips frames that look like the last captioned one. Output: JSON lines (stdout or "
        "--out), plus optional SRT/WebVTT subtitles. Ctrl-C / SIGTERM stop cleanly.",
    )
    watch.add_argument("source")
    watch.add_argument("--model", help="export directory (default: the embedded model)")
    watch.add_argument("--fps", type=positive_float,
                       help="at most this many captions per second (files: per second of video; "
                       "folders: files wait their turn, none is skipped)")
    watch.add_argument("--out", type=Path, help="append JSON lines here (default: stdout)")
    watch.add_argument("--srt", type=Path, help="write SRT subtitles here")
    watch.add_argument("--vtt", type=Path, help="write WebVTT subtitles here")
    watch.add_argument("--scene-threshold", type=float, default=0.08,
                       help="mean grayscale change (0-1) that counts as a new scene (default 0.08)")
    watch.add_argument("--heartbeat", type=float, help="caption at least every N seconds")
    watch.add_argument("--changes-only", action="store_true", help="emit only when the text changes")
    pace = watch.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=None,
                      help="pace files at their frame rate and drop stale frames (live default)")
    pace.add_argument("--lossless", dest="realtime", action="store_false",
                      help="never drop frames (file default)")
    watch.add_argument("--timeout-s", type=float, default=5.0, help="stream read timeout")
    watch.add_argument("--beams", type=int, dest="num_beams", help="beam width (default: model's)")
    watch.add_argument("--max-new-tokens", type=int)
    watch.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    watch.set_defaults(handler=run_watch)

    serve = commands.add_parser(
        "serve", help="HTTP captioning service (needs [serve] extra)",
        description="Serve POST /v1/captions with dynamic batching, backpressure (503 + "
        "Retry-After when the queue is full), /healthz, /readyz, /metrics and a demo page at /.",
    )
    serve.add_argument("--model", help="export directory (default: the embedded model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=8,
                       help="images captioned together (default 8); 1 makes each request's caption "
                            "independent of concurrent requests with int8 models, at lower throughput")
    serve.add_argument("--max-wait-ms", type=float, default=10.0,
                       help="how long the first queued image waits for company")
    serve.add_argument("--max-queue", type=int, default=32, help="queued images before 503")
    serve.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout")
    serve.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit")
    serve.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    serve.set_defaults(handler=run_serve)
    try:
        toolchain = importlib.import_module("edgecap.export.commands")
    except ImportError:  # runtime-only install: no export package
        toolchain = None
    if toolchain is not None:
        toolchain.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns the exit code: 0 ok, 1 runtime failure, 2 usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except EdgecapError as exc:
        print(f"edgecap: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        print(f"edgecap: error: {exc.name} is not installed; this command needs "
              f"`pip install 'edgecap[export]'`", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgecap: interrupted", file=sys.stderr)
        return 130


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def run_watch(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .captioner import Captioner
    from .sources import open_source
    from .watch import JsonlWriter, SubtitleWriter, WatchOptions, watch

    captioner = Captioner(args.model, cpu_threads=args.threads)
    source = open_source(args.source, timeout_s=args.timeout_s) if not Path(args.source).is_dir() \
        else open_source(args.source)
    options = WatchOptions(max_fps=args.fps, scene_threshold=args.scene_threshold,
                           heartbeat_s=args.heartbeat, changes_only=args.changes_only,
                           realtime=args.realtime)
    outputs = []  # every opened writer, closed (flushed) on the way out whatever happens
    try:
        path = args.out
        outputs.append(JsonlWriter(path))  # JSON lines go to stdout without --out
        for path, kind in ((args.srt, "srt"), (args.vtt, "vtt")):
            if path:
                outputs.append(SubtitleWriter(path, kind))
    except OSError as exc:
        for writer in outputs:
            writer.close()
        print(f"edgecap: error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}  # restored on the way out
    count = 0
    try:
        for record in watch(source, captioner, options, stop, num_beams=args.num_beams,
                            max_new_tokens=args.max_new_tokens):
            for writer in outputs:
                writer.add(record)
            count += 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for writer in outputs:
            writer.close()
        stats = source.stats
        print(f"edgecap: {count} captions, {stats.corrupt} corrupt frames skipped, "
              f"{stats.damaged_packets} damaged packets, {stats.reconnects} reconnects"
              + (f", read failed part way ({stats.read_errors}x)" if stats.read_errors else ""),
              file=sys.stderr)
    return 1 if stats.read_errors else 0  # a file that could not be read to its end


def run_serve(args: argparse.Namespace) -> int:
    from .server import Settings, serve

    settings = Settings(args.model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                        max_queue=args.max_queue, timeout_s=args.timeout_s,
                        max_body_bytes=int(args.max_body_mb * 2**20), cpu_threads=args.threads)
    print(f"edgecap: serving on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    serve(settings, args.host, args.port)
    return 0


def print_json(data: object) -> None:
    print(json.dumps(data, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    sys.exit(main())
