"""Each option table and record declaration is the one source of what it declares: the watch
options (flags, [[camera]] keys, bounds, WatchOptions), serve's Settings (flags, defaults), the
batch-size default, the result record's keys, the grouping of images by options and the JSONL
writer. Real parts throughout: the real parser, config loader, Captioner and files."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest
from edgecap import Captioner
from edgecap.caption_io import JsonlWriter, completed_sources
from edgecap.cli.main import _serve_settings, build_parser, main
from edgecap.errors import OptionsError
from edgecap.options import CAPTIONER_ARGUMENTS, DEFAULT_BATCH_SIZE, GENERATION
from edgecap.results import RECORD_KEYS, CaptionFailure, CaptionResult, record_keys
from edgecap.watch.config import CAMERA_KEYS, ConfigError, load_config
from edgecap.watch.options import WATCH, WatchOptions
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def subparser(name: str):
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    return commands.choices[name]


def flags_by_dest(parser) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for action in parser._actions:
        found.setdefault(action.dest, []).extend(action.option_strings)
    return found


# ---------------------------------------------------------------- watch


def test_every_watch_option_has_a_flag_a_camera_key_and_bounds():
    flags = flags_by_dest(subparser("watch"))
    for option in WATCH:
        assert set(option.cli_flags) <= set(flags[option.name]), option.name
        assert option.name in CAMERA_KEYS
        assert option.schema["type"] in ("number", "integer", "boolean")
        if option.schema["type"] == "number":  # every number is bounded below
            assert {"minimum", "exclusiveMinimum"} & set(option.schema), option.name
    assert set(CAMERA_KEYS) == {"name", "source", *(o.name for o in (*WATCH, *GENERATION))}


def test_watch_options_fields_and_defaults_come_from_the_table():
    fields = {f.name: f.default for f in dataclasses.fields(WatchOptions)}
    declared = {o.field: o.default for o in WATCH if o.field}
    assert fields == {**declared, "camera": ""}
    parsed = subparser("watch").parse_args(["cam.mp4"])
    for option in WATCH:  # the command's defaults are the table's
        assert getattr(parsed, option.name) == option.default, option.name
    assert WatchOptions.from_values(vars(parsed), "door") == WatchOptions(camera="door")


@pytest.mark.parametrize("flag,value", [
    ("--scene-threshold", "-1"), ("--scene-threshold", "1.5"), ("--heartbeat", "-1"),
    ("--heartbeat", "0"), ("--fps", "-2"), ("--timeout-s", "0"), ("--fps", "nan"),
])
def test_out_of_bounds_watch_flags_are_usage_errors(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        main(["watch", str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}:" in err and "Traceback" not in err


def test_the_config_docs_name_every_camera_option():
    text = (REPO / "docs" / "alerts.md").read_text()
    missing = [o.name for o in WATCH if f"`{o.name}`" not in text]
    assert not missing, f"docs/alerts.md's key table lacks {missing}"


def test_out_of_bounds_camera_keys_are_config_errors_naming_file_and_key(tmp_path, capsys):
    path = tmp_path / "cameras.toml"
    for key, value in (("scene_threshold", "-1"), ("heartbeat", "0"), ("timeout_s", "-5")):
        path.write_text(f'[[camera]]\nname = "door"\nsource = "door.mp4"\n{key} = {value}\n')
        path.chmod(0o600)
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:4: camera\.{key}: "
                           r"must be >"):
            load_config(path)
        assert main(["watch", "--config", str(path)]) == 1  # a config error, not a usage one
        assert f"camera.{key}: must be" in capsys.readouterr().err


def test_camera_switches_take_only_true_or_false(tmp_path):
    path = tmp_path / "cameras.toml"
    path.write_text('[[camera]]\nname = "door"\nsource = "door.mp4"\nchanges_only = "yes"\n')
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="camera.changes_only: expected true or false"):
        load_config(path)


def test_watch_options_built_in_python_are_bounded_too():
    with pytest.raises(OptionsError, match="scene_threshold must be >= 0"):
        WatchOptions(scene_threshold=-1)
    with pytest.raises(OptionsError, match="heartbeat_s must be > 0"):
        WatchOptions(heartbeat_s=0)


# ---------------------------------------------------------------- serve


# Settings fields the command fills from elsewhere than their own flag.
COMPUTED = {*CAPTIONER_ARGUMENTS.values(),  # RUNTIME, as Captioner's keywords
            "generation",  # GENERATION
            "api_keys", "allowed_hosts"}  # the bind policy
# serve flags that are no Settings field: where to bind, and what decides the bind policy.
BIND = {"host", "port", "api_key_file", "no_auth", "allowed_host"}


def test_settings_fields_equal_the_serve_flags():
    from edgecap.options import GENERATION_NAMES, RUNTIME
    from edgecap.serve.settings import Settings, setting_flags

    flagged = {name for name, _, _ in setting_flags()}
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert fields == flagged | COMPUTED and not flagged & COMPUTED
    dests = set(flags_by_dest(subparser("serve"))) - {"help"}
    runtime = {o.name for o in RUNTIME if o.name != "batch_size"}
    assert dests == flagged | BIND | runtime | set(GENERATION_NAMES)


def test_the_serve_command_defaults_are_settings_defaults(monkeypatch):
    from edgecap.serve.settings import Settings

    monkeypatch.delenv("EDGECAP_API_KEY", raising=False)
    built = _serve_settings(build_parser().parse_args(["serve"]))
    ignore = {"allowed_hosts"}  # a loopback bind answers loopback names only
    for field in dataclasses.fields(Settings):
        if field.name not in ignore:
            assert getattr(built, field.name) == getattr(Settings(), field.name), field.name


def test_serve_flags_in_their_own_units_reach_settings_in_the_fields():
    args = build_parser().parse_args(
        ["serve", "--max-body-mb", "2", "--max-image-mp", "1.5", "--cors-origin",
         "https://a.example", "--cors-origin", "https://b.example:8443",
         "--forwarded-allow-ips", "10.0.0.1, 10.0.0.2", "--metrics-auth", "--max-queue", "5"])
    settings = _serve_settings(args)
    assert settings.max_body_bytes == 2 * 2**20 and settings.max_image_pixels == 1_500_000
    assert settings.cors_origins == ("https://a.example", "https://b.example:8443")
    assert settings.forwarded_allow_ips == ("10.0.0.1", "10.0.0.2")
    assert settings.metrics_auth and settings.max_queue == 5


@pytest.mark.parametrize("flag,value", [("--max-queue", "0"), ("--max-body-mb", "-1"),
                                        ("--rate-limit", "-1"), ("--cors-origin", "ftp://x")])
def test_bad_serve_flags_are_usage_errors(capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", flag, value])
    assert info.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


def test_one_batch_size_default():
    from edgecap.distributed import caption_dataset
    from edgecap.serve.batcher import MicroBatcher
    from edgecap.serve.settings import Settings
    from edgecap.watch.cameras import watch_cameras

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    assert Settings().max_batch == DEFAULT_BATCH_SIZE
    assert default(MicroBatcher.__init__, "max_batch") == DEFAULT_BATCH_SIZE
    assert default(watch_cameras, "max_batch") == DEFAULT_BATCH_SIZE
    assert default(Captioner.caption, "batch_size") == DEFAULT_BATCH_SIZE
    assert default(Captioner.caption_stream, "batch_size") == DEFAULT_BATCH_SIZE
    assert default(caption_dataset, "batch_size") == DEFAULT_BATCH_SIZE
    assert subparser("caption").parse_args(["x.jpg"]).batch_size == DEFAULT_BATCH_SIZE


def test_the_micro_batcher_queues_as_many_as_settings_say():
    from edgecap.serve.batcher import MicroBatcher
    from edgecap.serve.settings import Settings

    for name in ("max_batch", "max_wait_ms", "max_queue"):
        assert inspect.signature(MicroBatcher.__init__).parameters[name].default == getattr(
            Settings(), name)


# ---------------------------------------------------------------- the record


def test_records_carry_exactly_the_declared_keys_in_order():
    from edgecap.errors import ImageError
    from edgecap.watch.stream import CaptionRecord

    result = CaptionResult("a dog", [1, 2], -0.5, "dog.jpg", {"total_ms": 3.0})
    assert tuple(result.to_record()) == record_keys("ok")
    failure = CaptionFailure("x.jpg", ImageError("x.jpg", "not an image"))
    assert tuple(failure.to_record()) == record_keys("error")
    record = CaptionRecord(result, 1.5, "2026-01-01T00:00:00+00:00", 7, 12.0, 0, "scene",
                           camera="door", snapshot="/s/7.jpg")
    assert tuple(record.to_record()) == record_keys("ok", "stream")
    assert len({key.name for key in RECORD_KEYS}) == len(RECORD_KEYS)


def test_ray_alerts_and_openapi_derive_their_keys_from_the_record():
    from edgecap.alerts.rules import PAYLOAD_KEYS, alert_payload
    from edgecap.distributed import RECORD_FIELDS
    from edgecap.serve.openapi import openapi_document

    assert RECORD_FIELDS == record_keys("ok", "error")
    assert PAYLOAD_KEYS == record_keys("alert")
    assert set(alert_payload({}, "r")) == {*record_keys("alert"), "rule"}
    text = openapi_document()["paths"]["/v1/captions"]["post"]["responses"]["200"]["description"]
    assert all(key in text for key in record_keys("ok"))


def test_docs_describe_every_record_key():
    text = (REPO / "docs" / "options.md").read_text()
    missing = [key.name for key in RECORD_KEYS if f"`{key.name}`" not in text]
    assert not missing, f"docs/options.md does not describe {missing}"


# ---------------------------------------------------------------- grouping and JSONL


@dataclasses.dataclass
class Item:
    image: object
    options: object
    source: str


def test_caption_grouped_batches_by_options_and_keeps_failures_to_their_group(tiny_export):
    captioner = Captioner(tiny_export)
    greedy, beam = captioner.options(num_beams=1), captioner.options(num_beams=2)
    images = [Image.new("RGB", (40, 30), (i * 60, 90, 200 - i * 50)) for i in range(3)]
    items = [Item(images[0], greedy, "a"), Item(images[1], beam, "b"),
             Item(images[2], greedy, "c")]
    groups = list(captioner.caption_grouped(items))
    assert [[m.source for m in members] for members, _ in groups] == [["a", "c"], ["b"]]
    alone = {i.source: captioner.caption_loaded([i.image], i.options, [i.source])[0] for i in items}
    for members, results in groups:
        for member, result in zip(members, results):
            assert result.token_ids == alone[member.source].token_ids
    broken = [Item("not an image", beam, "bad"), Item(images[0], greedy, "a")]
    outcomes = {m[0].source: r for m, r in captioner.caption_grouped(broken)}
    assert isinstance(outcomes["bad"], Exception) and outcomes["a"][0].text == alone["a"].text
    dropped = list(captioner.caption_grouped(items, admit=lambda group: group[:1]))
    assert [[m.source for m in members] for members, _ in dropped] == [["a"], ["b"]]


def test_one_jsonl_writer_for_files_stdout_and_text(tmp_path, capsys):
    ok = {"source": "a.jpg", "status": "ok", "generated_text": "a dog"}
    bad = {"source": "b.jpg", "status": "error", "error": "not an image"}
    out = tmp_path / "out.jsonl"
    with JsonlWriter(out, stdout=None) as lines:
        lines.write(ok)
        assert out.read_text() == json.dumps(ok) + "\n"  # flushed at once
    assert capsys.readouterr().out == ""
    with JsonlWriter(None, stdout="text", many=True) as lines:
        lines.write(ok)
        lines.write(bad)
    assert capsys.readouterr().out == "a.jpg\ta dog\nb.jpg\tERROR: not an image\n"
    with JsonlWriter(out, stdout="json") as lines:
        lines.add(CaptionResult("a cat", [3], -1.0, "c.jpg"))
    assert json.loads(capsys.readouterr().out)["generated_text"] == "a cat"
    assert completed_sources(out) == {"a.jpg", "c.jpg"}
