"""How ``edgecap serve`` runs, declared once.

``Settings`` is the table: each field that the command line sets carries its flag
(``metadata["flag"]``: a ``SettingFlag``, an ``Option`` with the flag's unit and section). The
``serve`` command's flags, their defaults and help (``add_setting_arguments``) and the
``Settings`` it builds (``settings_from_args``) all come from it, so adding a setting is one
field here. The runtime fields (device, threads, ...) and ``generation`` come from
``edgecap.options``'s tables; ``api_keys`` and ``allowed_hosts`` from the bind policy. Importing
this module is cheap (no starlette, no uvicorn): the CLI builds its parser from it for every
command.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..options import DEFAULT_BATCH_SIZE, Option, argparse_type, parse_integer, parse_number

DEFAULT_RATE_LIMIT = 20.0  # requests/s per client on a non-loopback --host
DEFAULT_RATE_BURST = 250  # above the demo page's snapshots per search, which load at once
MEGABYTE, MEGAPIXEL = 2**20, 10**6


@dataclass(frozen=True)
class SettingFlag(Option):
    """A setting's command-line flag: ``Option`` (parser, bounds, help) plus where it goes."""

    section: str = ""  # the --help section: "" (the service), "security" or "limits"
    scale: int = 1  # field units per flag unit (megabytes -> bytes, megapixels -> pixels)
    repeat: bool = False  # repeatable; the field holds every value given, as a tuple
    split: str | None = None  # one value holding a list; the field holds its items, as a tuple
    unset: bool = False  # the flag's default is unset: the command decides (its help says how)


def _flag(default: Any, help: str, parse=parse_number, schema: dict | None = None, **extra
          ) -> Any:
    """A field set by the flag ``--NAME-WITH-DASHES`` (or ``flags=``); the default is the
    field's, shown in the help in the flag's own unit."""
    kind = "integer" if parse is parse_integer else "number" if parse is parse_number else "string"
    option = SettingFlag("", parse, help, schema or {"type": kind}, **extra)
    return field(default=default, metadata={"flag": option})


_POSITIVE_INT = {"type": "integer", "minimum": 1}
_POSITIVE = {"type": "number", "exclusiveMinimum": 0}


def _origin(text: str) -> str:
    from .security import UnsafeBind, cors_origin  # it needs uvicorn: only when the flag is used

    try:
        return cors_origin(text)
    except UnsafeBind as exc:  # the part after "--cors-origin X: " says what is wrong
        raise ValueError(str(exc).partition(": ")[2]) from None


@dataclass
class Settings:
    """How the service runs; ``generation`` holds its default options (requests may override)."""

    model: str | Path | None = _flag(None, "export directory (default: the embedded model)",
                                     str, {"type": "string"})
    max_batch: int = _flag(DEFAULT_BATCH_SIZE, "most images captioned together", parse_integer,
                           _POSITIVE_INT)
    max_wait_ms: float = _flag(10.0, "how long the first queued image waits for company",
                               schema={"type": "number", "minimum": 0})
    max_queue: int = _flag(32, "queued images before 503", parse_integer, _POSITIVE_INT)
    timeout_s: float = _flag(30.0, "per-request timeout in seconds", schema=_POSITIVE)
    max_body_bytes: int = _flag(20 * MEGABYTE, "request body limit in MB", schema=_POSITIVE,
                                flags=("--max-body-mb",), scale=MEGABYTE)
    max_images: int = _flag(8, "images in one request: multipart files, or the images of a chat "
                            "request (Frigate may send more frames)", parse_integer,
                            _POSITIVE_INT, section="limits", metavar="N")
    cpu_threads: int | None = None
    device: str = "cpu"
    precision: str = "fp32"  # the GPU settings, as for Captioner
    engine_cache: str | Path | None = None
    io_binding: str = "auto"
    # Full-size decodes for every request that does not ask otherwise (options.RUNTIME).
    exact_preprocessing: bool = False
    generation: dict[str, Any] = field(default_factory=dict)
    # A caption archive to search (GET /v1/events).
    archive: str | Path | None = _flag(
        None, "also serve this caption archive: GET /v1/events (search) and /v1/snapshots/ID, "
        "plus a search box on the demo page", Path, {"type": "string"}, metavar="DB")
    snapshots: Path | None = _flag(
        None, "serve snapshots only from inside this folder, symlinks resolved (default: the "
        "archive's folder)", Path, {"type": "string"}, metavar="DIR")
    api_keys: tuple[str, ...] = ()  # with keys, every request outside OPEN_PATHS needs one
    allowed_hosts: tuple[str, ...] | None = None  # Host names answered (None: any)
    tls_cert: Path | None = _flag(None, "serve HTTPS with this certificate chain (needs "
                                  "--tls-key)", Path, {"type": "string"}, metavar="PEM",
                                  section="security")
    tls_key: Path | None = _flag(None, "the certificate's key", Path, {"type": "string"},
                                 metavar="PEM", section="security")
    # Beyond it uvicorn answers 503 before reading the request.
    max_connections: int = _flag(128, "open connections before new ones get 503", parse_integer,
                                 _POSITIVE_INT, section="limits", metavar="N")
    metrics_auth: bool = _flag(False, "/metrics needs the API key too", None,
                               {"type": "boolean"}, section="security")
    cors_origins: tuple[str, ...] = _flag(
        (), "let web pages from this origin (https://host[:port]) call the API from a browser "
        "(repeatable; default: no CORS)", _origin, {"type": "string"}, flags=("--cors-origin",),
        metavar="ORIGIN", section="security", repeat=True)
    rate_limit: float = _flag(
        0.0, "requests a second per client address, 429 + Retry-After beyond it; 0: off "
        f"(default: off on a loopback --host, {DEFAULT_RATE_LIMIT:g} on others)",
        schema={"type": "number", "minimum": 0}, metavar="REQ_PER_S", section="limits",
        unset=True)
    rate_burst: int = _flag(DEFAULT_RATE_BURST, "requests an idle client may send at once (a "
                            "demo-page search loads its snapshots)", parse_integer,
                            _POSITIVE_INT, metavar="N", section="limits")
    # Slow request headers (slowloris) and idle keep-alive connections are cut off after these.
    header_timeout_s: float = _flag(10.0, "close a connection whose request headers take longer",
                                    schema=_POSITIVE, metavar="S", section="limits")
    keep_alive_s: float = _flag(5.0, "close an idle keep-alive connection after this",
                                schema=_POSITIVE, metavar="S", section="limits")
    # Peers whose X-Forwarded-For / -Proto are believed (proxies); none: the headers are ignored.
    forwarded_allow_ips: tuple[str, ...] = _flag(
        (), "comma-separated proxy addresses (or networks) whose X-Forwarded-For names the "
        "client; default: none, the header is ignored and the peer's address is the client",
        str, {"type": "string"}, metavar="IPS", section="limits", split=",", unset=True)
    # Fairness (serve_fairness, serve_limits): work units (images x beams x new tokens) and open
    # connections one client address may hold; None: a quarter of max_connections.
    max_client_cost: int = _flag(
        4096, "work one client address may have in flight, in images x beams x max_new_tokens; "
        "beyond it 429 + Retry-After, though a client with nothing in flight is always admitted",
        parse_integer, _POSITIVE_INT, metavar="UNITS", section="limits")
    max_client_connections: int | None = _flag(
        None, "open connections one client address may hold; more are closed (default: a "
        "quarter of --max-connections; proxies excepted)", parse_integer, _POSITIVE_INT,
        metavar="N", section="limits")
    # Decode memory (decode_guard): a small PNG can decode to tens of megapixels.
    max_image_pixels: int = _flag(50 * MEGAPIXEL, "megapixels one image may have, 422 beyond",
                                  schema=_POSITIVE, flags=("--max-image-mp",), scale=MEGAPIXEL,
                                  metavar="MP", section="limits")
    max_request_pixels: int = _flag(100 * MEGAPIXEL, "megapixels of one request's images "
                                    "together, 413 beyond", schema=_POSITIVE,
                                    flags=("--max-request-mp",), scale=MEGAPIXEL, metavar="MP",
                                    section="limits")
    decode_pixels: int = _flag(64 * MEGAPIXEL, "megapixels decoded at once across requests; "
                               "others wait their turn", schema=_POSITIVE,
                               flags=("--decode-mp",), scale=MEGAPIXEL, metavar="MP",
                               section="limits")


def setting_flags() -> list[tuple[str, SettingFlag, Any]]:
    """``(field, flag, field default)`` for every field the command line sets, in order."""
    return [(f.name, f.metadata["flag"], f.default if f.default is not MISSING else None)
            for f in fields(Settings) if "flag" in f.metadata]


def add_setting_arguments(parser: argparse.ArgumentParser,
                          sections: dict[str, argparse._ActionsContainer]) -> None:
    """One flag per flagged ``Settings`` field, in the section its flag names."""
    for name, flag, default in setting_flags():
        where = sections.get(flag.section, parser)
        names = flag.flags or ("--" + name.replace("_", "-"),)
        if flag.schema["type"] == "boolean":
            where.add_argument(*names, dest=name, action="store_true", help=flag.help)
            continue
        metavar = flag.metavar or names[0].lstrip("-").replace("-", "_").upper()
        where.add_argument(*names, dest=name, type=argparse_type(_named(flag, names)),
                           metavar=metavar, action="append" if flag.repeat else None,
                           default=None if flag.unset or flag.repeat else _shown(default, flag),
                           help=flag.help + _default_note(default, flag))


def settings_from_args(args: argparse.Namespace, **computed: Any) -> Settings:
    """``Settings`` from the parsed flags (in the fields' units), plus ``computed`` fields (the
    runtime options, generation, the bind policy's keys and hosts, a decided rate limit)."""
    values: dict[str, Any] = {}
    for name, flag, _default in setting_flags():
        value = getattr(args, name, None)
        if value is None:
            continue  # an unset flag: the field keeps its default
        if flag.repeat:
            value = tuple(value)
        elif flag.split is not None:
            value = tuple(item.strip() for item in value.split(flag.split) if item.strip())
        elif flag.scale != 1:
            value = int(value * flag.scale)
        values[name] = value
    return Settings(**{**values, **computed})


def _named(flag: SettingFlag, names: tuple[str, ...]) -> SettingFlag:
    """The flag named as the user typed it in its errors (``max-body-mb must be > 0``)."""
    return SettingFlag(names[0].lstrip("-"), flag.parse, flag.help, flag.schema)


def _shown(default: Any, flag: SettingFlag) -> Any:
    """A field's default in the flag's unit."""
    return default / flag.scale if flag.scale != 1 and default is not None else default


def _default_note(default: Any, flag: SettingFlag) -> str:
    shown = _shown(default, flag)
    if flag.unset or flag.repeat or shown in (None, (), False):
        return ""
    return f" (default {shown:g})" if isinstance(shown, float) else f" (default {shown})"
