"""The ``edgecap`` command line: one module per subcommand family over the core."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    # Imported on call, so `edgecap.cli.arg_types` (which the export toolchain uses) stays light.
    from .main import main as run

    return run(argv)
