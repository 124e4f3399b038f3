"""One options layer: every captioning front end exposes the same options, parsed and bounded
the same way, and writes the same record (``CaptionResult.to_record()``)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading

import pytest

from edgecap import Captioner, CaptionResult, OptionsError
from edgecap.cli.main import build_parser, main
from edgecap.options import GENERATION, GENERATION_NAMES, REQUEST_OPTIONS

RECORD_KEYS = {"source", "status", "generated_text", "score", "token_ids", "tags", "latency_ms"}


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("no subcommands")


def option_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions}


@pytest.mark.parametrize("command", ["caption", "watch", "serve", "eval", "quality-report"])
def test_every_captioning_command_has_every_generation_option(command):
    dests = option_dests(subcommand(command))
    assert set(GENERATION_NAMES) <= dests
    if command != "quality-report":  # compares two exports on the CPU it runs on
        assert {"device", "threads", "exact_preprocessing"} <= dests


def test_the_openapi_document_lists_the_same_options():
    pytest.importorskip("starlette")
    from edgecap.serve.app import openapi_document

    post = openapi_document()["paths"]["/v1/captions"]["post"]
    names = {option.name for option in REQUEST_OPTIONS}
    assert names == set(GENERATION_NAMES) | {"exact_preprocessing"}
    assert {p["name"] for p in post["parameters"]} == names
    form = post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert names <= set(form)
    exact = next(p for p in post["parameters"] if p["name"] == "exact_preprocessing")
    assert exact["schema"]["type"] == "boolean" and exact["description"]
    beams = next(p for p in post["parameters"] if p["name"] == "num_beams")
    assert beams["schema"]["minimum"] == 1 and beams["description"]


def test_new_options_change_captions_the_same_way_everywhere(tiny_export, photos, capsys):
    """min_new_tokens and repetition_penalty, declared once, reach the CLI and the API alike."""
    captioner = Captioner(tiny_export)
    options = {"min_new_tokens": 6, "max_new_tokens": 8, "repetition_penalty": 1.3}
    api = captioner.caption(photos[0], **options)
    plain = captioner.caption(photos[0], max_new_tokens=8)
    assert len(api.token_ids) >= 6
    assert main(["caption", str(photos[0]), "--model", str(tiny_export), "--json",
                 "--min-new-tokens", "6", "--max-new-tokens", "8",
                 "--repetition-penalty", "1.3"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["token_ids"] == api.token_ids
    assert set(record) == RECORD_KEYS
    assert api.token_ids != plain.token_ids or len(plain.token_ids) >= 6


@pytest.mark.parametrize("flag,value,message", [
    ("--beams", "0", "must be >= 1"),
    ("--max-new-tokens", "x", "expected an integer"),
    ("--repetition-penalty", "0", "must be > 0"),
    ("--early-stopping", "maybe", "true, false or never"),
    ("--device", "tpu", "device must be one of cpu, cuda, tensorrt, auto"),
    ("--batch-size", "0", "must be >= 1"),
])
def test_bad_flags_are_usage_errors_naming_the_problem(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", "x.jpg", flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_python_options_use_the_same_bounds(tiny_export, photos):
    captioner = Captioner(tiny_export)
    with pytest.raises(OptionsError, match="num_beams must be >= 1"):
        captioner.caption(photos[0], num_beams=0)
    with pytest.raises(OptionsError, match="unknown generation options"):
        captioner.caption(photos[0], beams=2)
    with pytest.raises(OptionsError, match="min_new_tokens cannot exceed"):
        captioner.caption(photos[0], min_new_tokens=5, max_new_tokens=3)
    assert captioner.options(early_stopping="never").early_stopping == "never"


def test_every_option_has_help_and_a_schema():
    for option in GENERATION:
        assert option.help and option.schema.get("type"), option.name


def test_records_are_one_format(tiny_export, photos, tmp_path):
    captioner = Captioner(tiny_export)
    result = captioner.caption(photos[0])
    assert isinstance(result, CaptionResult)
    record = result.to_record()
    assert set(record) == RECORD_KEYS and record["generated_text"] == result.text
    missing = tmp_path / "missing.jpg"
    outcomes = list(captioner.caption_stream([photos[0], missing, photos[1]], batch_size=2))
    assert [o.ok for o in outcomes] == [True, False, True]
    failure = outcomes[1].to_record()
    assert failure == {"source": str(missing), "status": "error", "error": "file not found"}


def test_caption_stream_keeps_input_order_across_batches(tiny_export, photos, tmp_path):
    captioner = Captioner(tiny_export)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    inputs = [photos[0], broken, photos[1], photos[2], broken, photos[3]]
    outcomes = list(captioner.caption_stream(inputs, batch_size=2))
    assert [o.source for o in outcomes] == [str(p) for p in inputs]
    expected = captioner.caption([photos[0], photos[1], photos[2], photos[3]], batch_size=1)
    assert [o.token_ids for o in outcomes if o.ok] == [r.token_ids for r in expected]


def run_without(module: str, *argv: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter where ``module`` cannot be imported (a core-only install)."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from edgecap.cli import main\nsys.exit(main({list(argv)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module,argv,extra", [
    ("prometheus_client", ["serve"], "[serve]"),
    ("starlette", ["serve"], "[serve]"),
    ("av", ["watch", "video.mp4"], "[video]"),
])
def test_a_missing_extra_is_named_in_one_line(module, argv, extra, tmp_path):
    if argv[0] == "watch":
        (tmp_path / "video.mp4").write_bytes(b"\0" * 16)
        argv = ["watch", str(tmp_path / "video.mp4")]
    done = run_without(module, *argv)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'edgecap{extra}'" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_watch_rejects_bad_fps_before_starting_anything(tiny_export):
    from edgecap.watch.stream import WatchOptions, watch

    class Source:
        live, stopped, read = True, False, False

        def frames(self):
            Source.read = True
            return iter(())

        def stop(self):
            self.stopped = True

    before = threading.active_count()
    with pytest.raises(OptionsError, match="max_fps must be > 0"):
        watch(Source(), Captioner(tiny_export), WatchOptions(max_fps=0))
    assert threading.active_count() == before and not Source.read
