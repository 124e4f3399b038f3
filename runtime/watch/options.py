"""Every per-camera option of ``edgecap watch``, declared once.

``WATCH`` gives each option's name, parser, bounds, default and help. From it come the
command's flags (``add_watch_arguments``), the keys of a ``[[camera]]`` block in
``watch --config`` and their checks (``watch.config``), and ``WatchOptions``, which checks the
same bounds when Python code builds one. Adding an option is a change in this file (plus the
field on ``WatchOptions`` when the stream reads it). Importing this module is cheap: the CLI
builds its parser from it for every command.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import OptionsError
from ..options import Option, argparse_type, parse_number


def parse_true_false(value: Any) -> bool:
    """TOML's true or false (the command line's switches take no value)."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {value!r}")


@dataclass(frozen=True)
class WatchOption(Option):
    """An ``Option`` that also names where its value goes."""

    field: str | None = None  # the WatchOptions attribute it sets (None: the source reads it)
    off_flag: tuple[str, str] | None = None  # a switch's opposite flag and that flag's help


_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_SWITCH = {"type": "boolean"}
WATCH: tuple[WatchOption, ...] = (
    WatchOption("fps", parse_number, "at most this many captions per second (files: per second "
                "of video; folders: files wait their turn, none is skipped)", _POSITIVE,
                field="max_fps"),
    WatchOption("scene_threshold", parse_number, "mean grayscale change that counts as a new "
                "scene", {"type": "number", "minimum": 0, "maximum": 1}, default=0.08,
                field="scene_threshold"),
    WatchOption("heartbeat", parse_number, "caption at least every N seconds", _POSITIVE,
                field="heartbeat_s"),
    WatchOption("changes_only", parse_true_false, "emit only when the text changes", _SWITCH,
                default=False, field="changes_only"),
    WatchOption("realtime", parse_true_false, "pace files at their frame rate and drop stale "
                "frames (live default)", _SWITCH, field="realtime",
                off_flag=("--lossless", "never drop frames (file default)")),
    WatchOption("timeout_s", parse_number, "stream read timeout in seconds", _POSITIVE,
                default=5.0),
)
_BY_FIELD = {option.field: option for option in WATCH if option.field}


@dataclass(frozen=True)
class WatchOptions:
    """How one stream is captioned (``WATCH`` declares each field's bounds and default).

    Raises:
        OptionsError: a value out of its bounds (the message names the field).
    """

    max_fps: float | None = _BY_FIELD["max_fps"].default  # None: as fast as the model goes
    scene_threshold: float = _BY_FIELD["scene_threshold"].default  # the thumbnails' mean change
    heartbeat_s: float | None = _BY_FIELD["heartbeat_s"].default  # even without a scene change
    changes_only: bool = _BY_FIELD["changes_only"].default
    realtime: bool | None = _BY_FIELD["realtime"].default  # None: live sources yes, files no
    camera: str = ""  # a name for the source, carried by every record (archive, alerts)

    def __post_init__(self) -> None:
        for name, option in _BY_FIELD.items():
            value = getattr(self, name)
            if value is None:
                continue
            try:
                option.check(value)
            except OptionsError as exc:  # in the caller's words: the field, not the flag
                raise OptionsError(name + str(exc).removeprefix(option.name)) from None

    @classmethod
    def from_values(cls, values: Mapping[str, Any], camera: str) -> WatchOptions:
        """From parsed flags or config keys (by option name); unset ones keep their default."""
        return cls(**{name: values.get(option.name, option.default)
                      for name, option in _BY_FIELD.items()}, camera=camera)


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``WATCH`` option (a switch and its opposite are mutually exclusive)."""
    group = parser.add_argument_group("each camera (also keys of a [[camera]] block in --config)")
    for option in WATCH:
        if option.schema["type"] == "boolean":
            both = group.add_mutually_exclusive_group() if option.off_flag else group
            both.add_argument(*option.cli_flags, dest=option.name, action="store_true",
                              default=option.default, help=option.help)
            if option.off_flag:
                both.add_argument(option.off_flag[0], dest=option.name, action="store_false",
                                  help=option.off_flag[1])
            continue
        group.add_argument(*option.cli_flags, dest=option.name, type=argparse_type(option),
                           default=option.default, help=_help(option), metavar=option.metavar)


def _help(option: Option) -> str:
    """The help with the bounds and default, from the table (so the text cannot drift)."""
    low, high = option.schema.get("minimum"), option.schema.get("maximum")
    notes = [f"{low:g} to {high:g}"] if low is not None and high is not None else []
    if option.default is not None:
        notes.append(f"default {option.default:g}")
    return option.help + (f" ({'; '.join(notes)})" if notes else "")
