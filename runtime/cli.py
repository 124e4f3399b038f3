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


def print_json(data: object) -> None:
    print(json.dumps(data, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    sys.exit(main())
