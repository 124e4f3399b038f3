"""``edgecap`` command line: a thin layer over ``Captioner``.

Runtime commands live here. Toolchain commands (export, train, eval, ...) are registered by
``edgecap.export.commands`` when that package is importable; their heavy imports (torch,
transformers) happen only when one of them runs, so ``edgecap caption`` never loads them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Sequence

from .arg_types import positive_int
from .caption import add_caption_arguments, run_caption
from ..errors import EdgecapError, OptionsError
from ..options import (
    add_generation_arguments,
    add_option_argument,
    add_runtime_arguments,
    generation_from_args,
    runtime_from_args,
)
from ..watch.lanes import LANES
from ..watch.options import add_watch_arguments


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
    _add_watch_parser(commands)
    _add_serve_parser(commands)
    from . import search  # the caption archive's search (sqlite3 only: cheap to import)

    search.add_parser(commands)
    try:
        toolchain = importlib.import_module("edgecap.export.commands")
    except ImportError:  # runtime-only install: no export package
        toolchain = None
    if toolchain is not None:
        toolchain.register(commands)
    return parser


def _add_watch_parser(commands) -> None:
    watch = commands.add_parser(
        "watch", help="caption a video file, stream, camera or drop folder (needs [video])",
        description="Caption live video in real time: SOURCE is a video file, an rtsp:// or "
        "http(s):// stream, a camera (/dev/video0) or a folder that receives image files. The "
        "reader keeps only the newest frame; stale frames are dropped and counted. A scene gate "
        "skips frames that look like the last captioned one. Output: JSON lines (stdout or "
        "--out), plus optional SRT/WebVTT subtitles. Ctrl-C / SIGTERM stop cleanly.",
    )
    watch.add_argument("source", nargs="?",
                       help="video file, stream URL, camera device or folder (or use --config)")
    watch.add_argument("--config", type=Path, metavar="TOML",
                       help="many cameras, one model: a cameras.toml with [[camera]] and "
                       "[[alert]] tables (see docs/alerts.md); replaces SOURCE")
    watch.add_argument("--metrics-port", type=positive_int, metavar="PORT",
                       help="serve per-camera Prometheus metrics on 127.0.0.1:PORT/metrics")
    add_option_argument(watch, LANES)
    watch.add_argument("--model", help="export directory (default: the embedded model)")
    watch.add_argument("--out", type=Path, help="append JSON lines here (default: stdout)")
    watch.add_argument("--srt", type=Path, help="write SRT subtitles here")
    watch.add_argument("--vtt", type=Path, help="write WebVTT subtitles here")
    add_watch_arguments(watch)
    archive = watch.add_argument_group("archive (search it later with `edgecap search`)")
    archive.add_argument("--archive", type=Path, metavar="DB",
                         help="also store every caption in this SQLite archive (created if "
                         "missing; several watchers may share one)")
    archive.add_argument("--camera", help="the name stored with each caption (default: from the "
                         "source's file name or URL)")
    archive.add_argument("--snapshots", type=Path, metavar="DIR",
                         help="save each captioned frame here as a small JPEG (needs --archive)")
    archive.add_argument("--keep-days", type=positive_float, metavar="N",
                         help="prune captions and snapshots older than N days (the newest hour "
                         "is always kept)")
    archive.add_argument("--max-disk-mb", type=positive_float, metavar="M",
                         help="prune the oldest captions and snapshots while the archive uses "
                         "more than M MB")
    add_generation_arguments(watch)
    add_runtime_arguments(watch)
    watch.set_defaults(handler=_run_watch)


def _add_serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve", help="HTTP captioning service (needs [serve] extra)",
        description="Serve POST /v1/captions with dynamic batching, backpressure (503 + "
        "Retry-After when the queue is full), /healthz, /readyz, /metrics and a demo page at /.",
    )
    from ..serve.settings import add_setting_arguments  # argparse only: no starlette here

    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    security = serve.add_argument_group(
        "security", "A --host other than loopback needs --api-key-file (or EDGECAP_API_KEY) or "
        "--insecure-no-auth. See docs/serve.md and docs/deploy.md.")
    _add_bind_arguments(security)
    limits = serve.add_argument_group("limits", "Against abuse; see docs/serve.md.")
    add_setting_arguments(serve, {"security": security, "limits": limits})
    add_generation_arguments(serve)  # the service's defaults; each request may override them
    add_runtime_arguments(serve)
    serve.set_defaults(handler=run_serve)


def _add_bind_arguments(security) -> None:
    """What decides whether a --host may be served: keys, the opt-out, the Host names."""
    security.add_argument("--api-key-file", type=Path, metavar="FILE",
                          help="API keys, one a line (# comments); clients send 'Authorization: "
                          "Bearer KEY' to every endpoint but /, /healthz, /readyz, /openapi.json "
                          "and (without --metrics-auth) /metrics")
    security.add_argument("--insecure-no-auth", dest="no_auth", action="store_true",
                          help="serve a non-loopback --host without API keys (only behind a "
                          "proxy that authenticates; a warning is printed)")
    security.add_argument("--no-auth", dest="no_auth", action="store_true",
                          help=argparse.SUPPRESS)  # the earlier name of --insecure-no-auth
    security.add_argument("--allowed-host", action="append", metavar="NAME",
                          help="also answer requests for this Host name (repeatable; loopback "
                          "binds answer only loopback names by default)")


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
    except OptionsError as exc:  # a usage error the parser could not see (it needs the model)
        print(f"edgecap: error: {exc}", file=sys.stderr)
        return 2
    except EdgecapError as exc:
        print(f"edgecap: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        print(missing_extra_message(args.command, exc.name), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgecap: interrupted", file=sys.stderr)
        return 130


# The optional module -> the extra that installs it (pyproject.toml's optional-dependencies).
EXTRA_OF_MODULE = {
    "starlette": "serve", "uvicorn": "serve", "multipart": "serve", "python_multipart": "serve",
    "prometheus_client": "serve", "av": "video", "optimum": "bench", "matplotlib": "bench",
    "paho": "alerts", "ray": "ray",
}


def missing_extra_message(command: str, module: str | None) -> str:
    """One line naming the extra that provides ``module`` (the toolchain's by default)."""
    top = (module or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top, "export")
    return (f"edgecap: error: `edgecap {command}` needs the [{extra}] extra ({top or 'a module'} "
            f"is not installed): pip install 'edgecap[{extra}]'")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def _run_watch(args: argparse.Namespace) -> int:
    from .watch import run_watch

    return run_watch(args)


def run_serve(args: argparse.Namespace) -> int:
    from ..serve.app import serve

    settings = _serve_settings(args)
    if settings is None:
        return 2
    serve(settings, args.host, args.port)
    return 0


def _serve_settings(args: argparse.Namespace):
    """``Settings`` for ``edgecap serve``, or None after printing why the bind is refused."""
    from ..serve.security import UnsafeBind, bind_policy, is_loopback, load_api_keys
    from ..serve.settings import DEFAULT_RATE_LIMIT, settings_from_args

    try:
        policy = bind_policy(args.host, load_api_keys(args.api_key_file), args.no_auth,
                             args.allowed_host)
    except UnsafeBind as exc:  # a usage error: exit 2, like argparse
        print(f"edgecap serve: error: {exc}", file=sys.stderr)
        return None
    _warn_insecure(args, policy.api_keys)
    rate = args.rate_limit
    if rate is None:  # local tools and benchmarks are not throttled; network clients are
        rate = 0.0 if is_loopback(args.host) else DEFAULT_RATE_LIMIT
    return settings_from_args(args, **runtime_from_args(args),
                              generation=generation_from_args(args), api_keys=policy.api_keys,
                              allowed_hosts=policy.allowed_hosts, rate_limit=rate)


def _warn_insecure(args: argparse.Namespace, api_keys: tuple[str, ...]) -> None:
    """Warnings at start for a service that anyone on the network could use or read."""
    from ..serve.security import is_loopback

    if args.no_auth:
        print(f"edgecap: warning: --insecure-no-auth: anyone who can reach {args.host}:"
              f"{args.port} can caption images and read the archive without a key",
              file=sys.stderr)
    if api_keys and args.tls_cert is None and not is_loopback(args.host):
        print("edgecap: warning: API keys cross the network in clear text without --tls-cert",
              file=sys.stderr)
    if args.metrics_auth and not api_keys:
        print("edgecap: warning: --metrics-auth has no effect without API keys", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
