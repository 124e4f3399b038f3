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
from ..options import add_generation_arguments, add_runtime_arguments, generation_from_args


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
    watch.add_argument("--timeout-s", type=positive_float, default=5.0,
                       help="stream read timeout in seconds (default 5)")
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
    serve.add_argument("--model", help="export directory (default: the embedded model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=positive_int, default=8,
                       help="most images captioned together (default 8)")
    serve.add_argument("--max-wait-ms", type=float, default=10.0,
                       help="how long the first queued image waits for company (default 10)")
    serve.add_argument("--max-queue", type=positive_int, default=32,
                       help="queued images before 503 (default 32)")
    serve.add_argument("--timeout-s", type=positive_float, default=30.0,
                       help="per-request timeout in seconds (default 30)")
    serve.add_argument("--max-body-mb", type=positive_float, default=20.0,
                       help="request body limit in MB (default 20)")
    serve.add_argument("--archive", type=Path, metavar="DB",
                       help="also serve this caption archive: GET /v1/events (search) and "
                       "/v1/snapshots/ID, plus a search box on the demo page")
    serve.add_argument("--snapshots", type=Path, metavar="DIR",
                       help="serve snapshots only from inside this folder, symlinks resolved "
                       "(default: the archive's folder)")
    _add_serve_security_arguments(serve)
    add_generation_arguments(serve)  # the service's defaults; each request may override them
    add_runtime_arguments(serve)
    serve.set_defaults(handler=run_serve)


def _add_serve_security_arguments(serve) -> None:
    security = serve.add_argument_group(
        "security", "A --host other than loopback needs --api-key-file (or EDGECAP_API_KEY) or "
        "--insecure-no-auth. See docs/serve.md and docs/deploy.md.")
    security.add_argument("--api-key-file", type=Path, metavar="FILE",
                          help="API keys, one a line (# comments); clients send 'Authorization: "
                          "Bearer KEY' to every endpoint but /, /healthz, /readyz, /openapi.json "
                          "and (without --metrics-auth) /metrics")
    security.add_argument("--insecure-no-auth", dest="no_auth", action="store_true",
                          help="serve a non-loopback --host without API keys (only behind a "
                          "proxy that authenticates; a warning is printed)")
    security.add_argument("--no-auth", dest="no_auth", action="store_true",
                          help=argparse.SUPPRESS)  # the earlier name of --insecure-no-auth
    security.add_argument("--metrics-auth", action="store_true",
                          help="/metrics needs the API key too")
    security.add_argument("--allowed-host", action="append", metavar="NAME",
                          help="also answer requests for this Host name (repeatable; loopback "
                          "binds answer only loopback names by default)")
    security.add_argument("--cors-origin", action="append", metavar="ORIGIN", type=_cors_origin,
                          help="let web pages from this origin (https://host[:port]) call the "
                          "API from a browser (repeatable; default: no CORS)")
    security.add_argument("--tls-cert", type=Path, metavar="PEM",
                          help="serve HTTPS with this certificate chain (needs --tls-key)")
    security.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's key")
    _add_serve_limit_arguments(serve)


def _add_serve_limit_arguments(serve) -> None:
    limits = serve.add_argument_group("limits", "Against abuse; see docs/serve.md.")
    limits.add_argument("--rate-limit", type=non_negative_float, metavar="REQ_PER_S",
                        help="requests a second per client address, 429 + Retry-After beyond "
                        f"it; 0: off (default: off on a loopback --host, {DEFAULT_RATE_LIMIT:g} "
                        "on others)")
    limits.add_argument("--rate-burst", type=positive_int, default=DEFAULT_RATE_BURST,
                        metavar="N", help="requests an idle client may send at once "
                        f"(default {DEFAULT_RATE_BURST}: a demo-page search loads its snapshots)")
    limits.add_argument("--header-timeout-s", type=positive_float, default=10.0,
                        metavar="S",
                        help="close a connection whose request headers take longer (default 10)")
    limits.add_argument("--keep-alive-s", type=positive_float, default=5.0,
                        metavar="S",
                        help="close an idle keep-alive connection after this (default 5)")
    limits.add_argument("--max-connections", type=positive_int, default=128, metavar="N",
                        help="open connections before new ones get 503 (default 128)")
    limits.add_argument("--max-images", type=positive_int, default=DEFAULT_MAX_IMAGES, metavar="N",
                        help="images in one request: multipart files, or the images of a chat "
                        f"request (default {DEFAULT_MAX_IMAGES}; Frigate may send more frames)")
    limits.add_argument("--forwarded-allow-ips", metavar="IPS",
                        help="comma-separated proxy addresses (or networks) whose "
                        "X-Forwarded-For names the client; default: none, the header is "
                        "ignored and the peer's address is the client")
    limits.add_argument("--max-client-cost", type=positive_int, default=4096, metavar="UNITS",
                        help="work one client address may have in flight, in images x beams x "
                        "max_new_tokens; beyond it 429 + Retry-After, though a client with "
                        "nothing in flight is always admitted (default %(default)s)")
    limits.add_argument("--max-client-connections", type=positive_int, metavar="N",
                        help="open connections one client address may hold; more are closed "
                        "(default: a quarter of --max-connections; proxies excepted)")
    # Decode memory (edgecap.decode_guard): a small PNG can decode to tens of megapixels.
    limits.add_argument("--max-image-mp", type=positive_float, default=50.0, metavar="MP",
                        help="megapixels one image may have, 422 beyond (default %(default)s)")
    limits.add_argument("--max-request-mp", type=positive_float, default=100.0, metavar="MP",
                        help="megapixels of one request's images together, 413 beyond "
                        "(default %(default)s)")
    limits.add_argument("--decode-mp", type=positive_float, default=64.0, metavar="MP",
                        help="megapixels decoded at once across requests; others wait their "
                        "turn (default %(default)s)")


DEFAULT_RATE_LIMIT = 20.0  # requests/s per client on a non-loopback --host
DEFAULT_RATE_BURST = 250  # above the demo page's 200 snapshots per search
DEFAULT_MAX_IMAGES = 8


def _cors_origin(text: str) -> str:
    from ..serve.security import UnsafeBind, cors_origin

    try:
        return cors_origin(text)
    except UnsafeBind as exc:
        raise argparse.ArgumentTypeError(str(exc).partition(": ")[2]) from None


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


def non_negative_float(text: str) -> float:
    """A number >= 0 (0 turns a limit off)."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass  # positive_float says what is wrong
    return positive_float(text)


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
    from ..serve.app import Settings

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
    return Settings(args.model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                    max_queue=args.max_queue, timeout_s=args.timeout_s,
                    max_body_bytes=int(args.max_body_mb * 2**20), cpu_threads=args.threads,
                    device=args.device, precision=args.precision,
                    engine_cache=args.engine_cache, io_binding=args.io_binding,
                    generation=generation_from_args(args),
                    archive=args.archive, snapshots=args.snapshots, api_keys=policy.api_keys,
                    allowed_hosts=policy.allowed_hosts, tls_cert=args.tls_cert,
                    tls_key=args.tls_key, max_connections=args.max_connections,
                    metrics_auth=args.metrics_auth, cors_origins=tuple(args.cors_origin or ()),
                    rate_limit=rate, rate_burst=args.rate_burst,
                    header_timeout_s=args.header_timeout_s, keep_alive_s=args.keep_alive_s,
                    forwarded_allow_ips=_ip_list(args.forwarded_allow_ips),
                    max_client_cost=args.max_client_cost,
                    max_client_connections=args.max_client_connections,
                    max_image_pixels=_pixels(args.max_image_mp),
                    max_request_pixels=_pixels(args.max_request_mp),
                    decode_pixels=_pixels(args.decode_mp),
                    max_images=args.max_images, exact_preprocessing=args.exact_preprocessing)


def _ip_list(text: str | None) -> tuple[str, ...]:
    return tuple(ip.strip() for ip in (text or "").split(",") if ip.strip())


def _pixels(megapixels: float) -> int:
    return int(megapixels * 1e6)


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
