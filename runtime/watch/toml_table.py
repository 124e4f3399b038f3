"""The TOML side of ``watch --config``: tables whose checked getters fail with one
``ConfigError`` line ``FILE:LINE: key: problem``.

tomllib gives no line numbers, so ``KeyLines`` finds the line of a key within its
``[[camera]]``/``[[alert]]`` block by reading the text.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EdgecapError
from ..options import Option, OptionsError
from ..secret_files import warn_if_readable

# The TOML types an option's value may have, by its schema type.
_TOML_KINDS = {"integer": (int, "an integer"), "number": ((int, float), "a number"),
               "boolean": ((bool, str), "true or false")}
_WORDS = ((bool, str), 'true, false or "never"')  # early_stopping; style is any string


class ConfigError(EdgecapError, ValueError):
    """A camera config file that cannot be used: ``FILE:LINE: key: problem``."""


class KeyLines:
    """Line numbers of keys in TOML text, per block: ``()`` is the top level (and plain
    ``[table]``s), ``("camera", 2)`` the third ``[[camera]]``."""

    HEADER = re.compile(r"\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
    KEY = re.compile(r"\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
                     r"(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")

    def __init__(self, text: str):
        self.lines: dict[tuple[tuple, tuple[str, ...]], int] = {}
        counts: dict[str, int] = {}
        block: tuple = ()
        prefix: tuple[str, ...] = ()
        in_string: str | None = None  # inside a multi-line string: no keys there
        for number, line in enumerate(text.splitlines(), 1):
            if in_string:
                in_string = None if line.count(in_string) % 2 else in_string
                continue
            if header := self.HEADER.match(line):
                parts = self._split(header.group(2))
                if header.group(1) == "[[":
                    counts[parts[0]] = counts.get(parts[0], 0) + 1
                    block, prefix = (parts[0], counts[parts[0]] - 1), parts[1:]
                elif parts[0] in counts:  # [alert.mqtt]: a table inside the last [[alert]]
                    block, prefix = (parts[0], counts[parts[0]] - 1), parts[1:]
                else:
                    block, prefix = (), parts
                self.lines.setdefault((block, prefix), number)
            elif key := self.KEY.match(line):
                self.lines.setdefault((block, prefix + self._split(key.group(1))), number)
                for quote in ('"""', "'''"):
                    if line.count(quote) % 2:
                        in_string = quote

    @staticmethod
    def _split(dotted: str) -> tuple[str, ...]:
        return tuple(part.strip().strip("\"'") for part in dotted.split("."))

    def line(self, block: tuple, keys: tuple[str, ...]) -> int:
        """The line of ``keys`` in ``block``, else of its closest parent (an inline table's
        key is on its parent's line), else of the block's header."""
        for end in range(len(keys), -1, -1):
            if (block, keys[:end]) in self.lines:
                return self.lines[(block, keys[:end])]
        return self.lines.get(((), block[:1]), 1)  # camera = [{...}]: an inline array of tables


class ConfigTable:
    """One TOML table of the file, with checked getters whose errors say file, line and key."""

    def __init__(self, source: ConfigSource, data: dict, block: tuple, keys: tuple[str, ...] = ()):
        self.source, self.data, self.block, self.keys = source, data, block, keys

    def error(self, key: str | None, problem: str) -> ConfigError:
        keys = self.keys + ((key,) if key else ())
        name = ".".join(((self.block[0],) if self.block else ()) + keys) or "file"
        line = self.source.key_lines.line(self.block, keys)
        return ConfigError(f"{self.source.path}:{line}: {name}: {problem}")

    def only(self, known: tuple[str, ...]) -> None:
        for key in self.data:
            if key == "password" and "password_env" in known:
                raise self.error(key, "keep secrets out of the config: use password_env "
                                 "(an environment variable's name) or password_file")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
                raise self.error(key, f"unknown key{hint}")

    def get(self, key: str, kinds: type | tuple[type, ...], what: str) -> Any:
        value = self.data.get(key)
        if value is None:
            return None
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        # TOML's true is a Python int too: a number option must not accept it
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(key, f"expected {what}, got {value!r}")
        return value

    def text(self, key: str, required: bool = False) -> str | None:
        value = self.get(key, str, "a string")
        if value is None and required:
            raise self.error(key, "missing (required)")
        if value is not None and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def number(self, key: str, low: float = 0.0, high: float | None = None,
               low_open: bool = True) -> float | None:
        value = self.get(key, (int, float), "a number")
        if value is None:
            return None
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high else "")
            raise self.error(key, f"must be {bound} (got {value})")
        return float(value)

    def integer(self, key: str, low: int, high: int) -> int | None:
        value = self.get(key, int, "an integer")
        if value is not None and not low <= value <= high:
            raise self.error(key, f"must be between {low} and {high} (got {value})")
        return value

    def option(self, option: Option) -> Any:
        """An option of a table (``WATCH``, ``GENERATION``): TOML's own type first (no numbers
        in strings), then the option's parser and bounds."""
        kinds, what = _TOML_KINDS.get(option.schema.get("type"), _WORDS)
        value = self.get(option.name, kinds, what)
        try:
            return None if value is None else option.check(value)
        except OptionsError as exc:
            raise self.error(option.name, str(exc).removeprefix(f"{option.name}: ")
                             .removeprefix(f"{option.name} ")) from None

    def table(self, key: str) -> ConfigTable | None:
        value = self.get(key, dict, "a table")
        if value is None:
            return None
        return ConfigTable(self.source, value, self.block, self.keys + (key,))

    def path(self, key: str) -> Path | None:
        value = self.text(key)
        return None if value is None else self.source.folder / Path(value).expanduser()

    def secret_file(self, key: str) -> str | None:
        path = self.path(key)
        try:
            text = None if path is None else path.read_text().strip()
        except OSError as exc:
            raise self.error(key, f"cannot read {path}: {exc.strerror or exc}") from None
        if path is not None:
            warn_if_readable(path, f"{key} of {self.source.path.name}:")
        return text

    def secret_env(self, key: str, name: str | None = None) -> str | None:
        variable = name if name is not None else self.text(key)
        if variable is not None and variable not in os.environ:
            raise self.error(key, f"environment variable {variable} is not set")
        return None if variable is None else os.environ[variable]


@dataclass
class ConfigSource:
    path: Path
    folder: Path
    key_lines: KeyLines
