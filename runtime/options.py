"""Every captioning option, declared once: name, type, bounds and help.

The CLI flags of every command that captions, the HTTP query/form fields and the OpenAPI
schema are all generated from ``GENERATION`` and ``RUNTIME`` below (a runtime option is an HTTP
field too when it is ``per_request``), so adding an option is a change in this file (plus the
field on ``GenerationOptions`` when it is a generation option).
Names follow transformers' ``GenerationConfig``; see docs/options.md.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from .errors import OptionsError


def parse_early_stopping(text: str | bool) -> bool | str:
    """transformers' ``early_stopping``: True, False or "never"."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    if value == "never":
        return "never"
    raise ValueError(f"expected true, false or never, got {text!r}")


@dataclass(frozen=True)
class Option:
    """One option: how it is named, parsed, bounded and explained, everywhere."""

    name: str  # Python keyword, HTTP field and OpenAPI name (transformers' name where one exists)
    parse: Callable[[Any], Any]  # text (CLI, HTTP) -> value; raises ValueError
    help: str
    schema: dict[str, Any]  # OpenAPI type and bounds; the bounds are also enforced by check()
    flags: tuple[str, ...] = ()  # CLI spellings; default: --name-with-dashes
    choices: tuple[str, ...] | None = None
    default: Any = None  # None: the model's manifest decides (generation) or the command does
    metavar: str | None = None  # what the CLI help calls the value (default: argparse's)
    per_request: bool = False  # a runtime option one HTTP request may set too

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def aliases(self) -> tuple[str, ...]:
        """HTTP field names accepted besides ``name`` (the CLI spellings, without dashes)."""
        return tuple(f.lstrip("-").replace("-", "_") for f in self.cli_flags
                     if f.lstrip("-").replace("-", "_") != self.name)

    def check(self, value: Any) -> Any:
        """``value`` parsed and within bounds, or OptionsError naming the option."""
        try:
            value = self.parse(value)
        except (TypeError, ValueError) as exc:
            raise OptionsError(f"{self.name}: {exc}") from None
        low, high = self.schema.get("minimum"), self.schema.get("maximum")
        if low is not None and value < low:
            raise OptionsError(f"{self.name} must be >= {low} (got {value})")
        if high is not None and value > high:
            raise OptionsError(f"{self.name} must be <= {high} (got {value})")
        if self.schema.get("exclusiveMinimum") is not None and value <= self.schema["exclusiveMinimum"]:
            raise OptionsError(f"{self.name} must be > {self.schema['exclusiveMinimum']} (got {value})")
        if self.choices and value not in self.choices:
            raise OptionsError(f"{self.name} must be one of {', '.join(self.choices)} (got {value})")
        return value


def _integer(text: Any) -> int:
    if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError(f"expected an integer, got {text!r}")
    # Text from a request: ASCII digits of a bounded length (int() would take any script's
    # digits and thousands of them), so every value is an ordinary machine integer.
    if isinstance(text, str) and not re.fullmatch(r"\s*[+-]?[0-9]{1,18}\s*", text):
        raise ValueError(f"expected an integer, got {text[:40]!r}")
    try:
        return int(text)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"expected an integer, got {str(text)[:40]!r}") from None


# Public for the option tables of the front ends (watch's lanes), which parse as these do.
parse_integer = _integer


def _number(text: Any) -> float:
    if isinstance(text, bool):
        raise ValueError(f"expected a number, got {text!r}")
    if isinstance(text, str) and (len(text) > 64 or not text.isascii()):
        raise ValueError(f"expected a number, got {text[:40]!r}")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


# Public names for the parsers other option tables reuse (watch, serve).
parse_integer, parse_number = _integer, _number

# The caps bound what one request may cost a shared service (beam search grows with the beams),
# and they size the input shapes a TensorRT engine is built for (gpu_providers.py).
MAX_BEAMS = 32
MAX_BATCH = 64
# Images captioned together unless a front end is told otherwise: the caption command, the
# service's micro-batches, a round of cameras and Ray's actor calls all start from it.
DEFAULT_BATCH_SIZE = 8

def parse_switch(text: str | bool) -> bool:
    """A yes/no option: true/false, on/off, yes/no or 1/0."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("true", "on", "yes", "1"):
        return True
    if value in ("false", "off", "no", "0"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


GENERATION: tuple[Option, ...] = (
    Option("num_beams", _integer, "beam width; 1 is greedy search",
           {"type": "integer", "minimum": 1, "maximum": MAX_BEAMS},
           flags=("--beams", "--num-beams")),
    Option("max_new_tokens", _integer, "longest caption, in tokens",
           {"type": "integer", "minimum": 1}),
    Option("min_new_tokens", _integer, "shortest caption, in tokens (the end token is held back "
           "until then)", {"type": "integer", "minimum": 0}),
    Option("length_penalty", _number, "beam search: exponent on the caption length when scores "
           "are compared (above 1 favours longer captions)", {"type": "number"}),
    Option("early_stopping", parse_early_stopping, "beam search: stop as soon as enough "
           "captions are finished (true), use a heuristic (false) or run to the length cap (never)",
           {"type": "string", "enum": ["true", "false", "never"]}),
    Option("no_repeat_ngram_size", _integer, "never repeat an n-gram of this many tokens "
           "(0: off)", {"type": "integer", "minimum": 0}),
    Option("repetition_penalty", _number, "divide the scores of tokens already in the caption by "
           "this (1: off, above 1 discourages repeats)", {"type": "number", "exclusiveMinimum": 0}),
    # Not a transformers option: models trained with style tokens start each caption with one.
    Option("style", str, "caption style, for models trained on several (e.g. describe: a "
           "plain description, alt-text: a web alt text); names in the model's manifest",
           {"type": "string"}),
    # Not a transformers option: grounded models (grounding.py) ban a label's words while its
    # presence score is below the model's threshold; other models ignore it.
    Option("presence_gate", parse_switch, "grounded models: never name a person (or another "
           "gated label) the model's presence score says is absent (false: decode ungated)",
           {"type": "boolean"}, metavar="BOOL"),
)

DEVICES = ("cpu", "cuda", "tensorrt", "auto")
PRECISIONS = ("fp32", "fp16")
IO_BINDING = ("auto", "on", "off")
RUNTIME: tuple[Option, ...] = (
    Option("device", str, "where the graphs run", {"type": "string", "enum": list(DEVICES)},
           choices=DEVICES, default="cpu"),
    Option("threads", _integer, "CPU threads for the model (default: the cores this process may use)",
           {"type": "integer", "minimum": 1}),
    Option("batch_size", _integer, "images captioned together; a caption does not depend on the "
           "rest of its batch", {"type": "integer", "minimum": 1, "maximum": MAX_BATCH},
           default=DEFAULT_BATCH_SIZE),
    Option("precision", str, "GPU arithmetic: fp16 lets tensorrt run layers in half precision "
           "(cuda needs an fp16 export for it; the CPU always runs the graphs as exported)",
           {"type": "string", "enum": list(PRECISIONS)}, choices=PRECISIONS, default="fp32"),
    Option("engine_cache", str, "folder for tensorrt's built engines, reused by later starts "
           "(default: a folder for this model in the user's cache)", {"type": "string"},
           metavar="DIR"),
    Option("io_binding", str, "keep the decoder's cache on the device between steps: auto (on "
           "cuda and tensorrt), on (also on the CPU) or off", {"type": "string",
           "enum": list(IO_BINDING)}, choices=IO_BINDING, default="auto"),
    # Not a transformers option: preprocess.py decodes large JPEGs and video frames at a reduced
    # scale by default; this restores the exact pixels (and transformers' parity) everywhere.
    Option("exact_preprocessing", parse_switch, "decode every image and frame at full size "
           "before the resize (slower on large images; by default those at least twice the "
           "model's input are decoded at a reduced scale that still covers it)",
           {"type": "boolean"}, default=False, per_request=True),
)
# Captioner keyword arguments by runtime option (batch_size belongs to caption(), not here).
CAPTIONER_ARGUMENTS = {"device": "device", "threads": "cpu_threads", "precision": "precision",
                       "engine_cache": "engine_cache", "io_binding": "io_binding",
                       "exact_preprocessing": "exact_preprocessing"}

GENERATION_NAMES = tuple(option.name for option in GENERATION)
# What one HTTP request may set: every generation option and the per-request runtime ones.
REQUEST_RUNTIME = tuple(option for option in RUNTIME if option.per_request)
REQUEST_OPTIONS = GENERATION + REQUEST_RUNTIME


def argparse_type(option: Option) -> Callable[[str], Any]:
    """An argparse type that parses and bounds-checks ``option`` (a usage error otherwise)."""
    def convert(text: str) -> Any:
        try:
            return option.check(text)
        except OptionsError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{option.name}: ")) from None
    convert.__name__ = option.schema.get("type", "value")  # argparse names it in its errors
    return convert


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Every generation flag; unset flags stay None so the model's own defaults apply."""
    group = parser.add_argument_group("generation (default: the model's own settings)")
    for option in GENERATION:
        group.add_argument(*option.cli_flags, dest=option.name, type=argparse_type(option),
                           default=None, help=option.help,
                           metavar=option.schema.get("type", "VALUE").upper())


def add_option_argument(parser, option: Option, default: Any = None,
                        help_text: str | None = None) -> None:
    """One option as a CLI flag: its spellings, parser, bounds and help (``help_text`` replaces
    the option's own); a boolean one is a switch with its opposite (``--x`` / ``--no-x``)."""
    text = option.help if help_text is None else help_text
    if option.schema.get("type") == "boolean":
        parser.add_argument(*option.cli_flags, dest=option.name, default=default,
                            action=argparse.BooleanOptionalAction, help=text)
        return
    parser.add_argument(*option.cli_flags, dest=option.name, type=argparse_type(option),
                        default=default, choices=option.choices, help=text,
                        metavar=option.metavar)


def add_runtime_arguments(parser: argparse.ArgumentParser, *, batch_size: int | None = None) -> None:
    """--device, --threads and the GPU settings, plus --batch-size when the command batches
    images."""
    group = parser.add_argument_group("runtime")
    for option in RUNTIME:
        if option.name == "batch_size" and batch_size is None:
            continue
        default = batch_size if option.name == "batch_size" else option.default
        switch = option.schema["type"] == "boolean"  # --x / --no-x say their default already
        extra = f" (default {default})" if default is not None and not switch else ""
        add_option_argument(group, option, default, option.help + extra)


def runtime_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``Captioner`` keyword arguments from the runtime flags (unset ones keep its defaults)."""
    return {keyword: getattr(args, name) for name, keyword in CAPTIONER_ARGUMENTS.items()
            if getattr(args, name, None) is not None}


def generation_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The generation flags the user set (None-valued ones left to the model)."""
    return {name: getattr(args, name) for name in GENERATION_NAMES
            if getattr(args, name, None) is not None}


def generation_from_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Generation options from HTTP query/form fields (names or their CLI aliases).

    Raises:
        OptionsError: a value that does not parse or is out of bounds (names the field).
    """
    return options_from_fields(fields, GENERATION)


def options_from_fields(fields: Mapping[str, Any], options: Iterable[Option]) -> dict[str, Any]:
    """The given ``options`` (e.g. ``REQUEST_RUNTIME``) from HTTP query/form fields, by name or
    CLI alias; fields left empty are absent.

    Raises:
        OptionsError: a value that does not parse or is out of bounds (names the field).
    """
    values: dict[str, Any] = {}
    for option in options:
        for key in (option.name, *option.aliases):
            raw = fields.get(key)
            if raw not in (None, ""):
                values[option.name] = option.check(raw)
                break
    return values


def check_generation(values: Mapping[str, Any]) -> dict[str, Any]:
    """Python keyword options checked against the same bounds as the CLI and HTTP."""
    unknown = set(values) - set(GENERATION_NAMES)
    if unknown:
        raise OptionsError(f"unknown generation options: {sorted(unknown)}; "
                           f"known: {', '.join(GENERATION_NAMES)}")
    by_name = {option.name: option for option in GENERATION}
    return {name: by_name[name].check(value) for name, value in values.items() if value is not None}


def openapi_parameters(options: Iterable[Option] = REQUEST_OPTIONS) -> list[dict[str, Any]]:
    """OpenAPI query parameters for ``options``."""
    return [{"name": o.name, "in": "query", "required": False, "description": o.help,
             "schema": dict(o.schema)} for o in options]


def openapi_form_properties(options: Iterable[Option] = REQUEST_OPTIONS) -> dict[str, Any]:
    """The same options as multipart form fields."""
    return {o.name: {**o.schema, "description": o.help} for o in options}
