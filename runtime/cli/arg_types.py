"""argparse types shared by every ``edgecap`` subcommand, so a bad count reads the same
everywhere: ``--max-batch: 0 is not at least 1``."""

from __future__ import annotations

import argparse
from typing import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than ``minimum`` (a usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not at least {minimum}")
        return value

    parse.__name__ = f"at_least_{minimum}"  # argparse names the type in some messages
    return parse


positive_int = at_least(1)
