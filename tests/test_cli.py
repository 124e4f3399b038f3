"""The CLI as users call it: main(argv) with real files."""

from __future__ import annotations

import json

import pytest

from edgecap import Captioner
from edgecap.cli.main import main


def test_caption_plain_and_json_match_api(tiny_export, flickr_images, capsys):
    api = Captioner(tiny_export).caption(flickr_images[:2], num_beams=2)
    assert main(["caption", *map(str, flickr_images[:2]), "--model", str(tiny_export), "--beams", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{img}\t{r.text}" for img, r in zip(flickr_images, api)]
    assert main(["caption", str(flickr_images[0]), "--model", str(tiny_export), "--json", "--beams", "2"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["generated_text"] == api[0].text and record["token_ids"] == api[0].token_ids


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("caption", "export", "train", "eval"):
        assert command in out


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["caption"])
    assert info.value.code == 2


def test_export_command(tiny_exports, tmp_path, capsys):
    pytest.importorskip("torch")
    hf_dir, reference_export = next(iter(tiny_exports.values()))
    out = tmp_path / "exported"
    assert main(["export", str(hf_dir), str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["parity"]["max_abs_logit_diff"] < 1e-3
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference_export.iterdir())


def test_export_of_non_model_fails_cleanly(tmp_path, capsys):
    pytest.importorskip("torch")
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "no config.json" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_watch_reports_bad_sources_and_outputs_in_one_line(tiny_export, tmp_path, capsys):
    pytest.importorskip("av")
    missing = tmp_path / "missing.mp4"
    assert main(["watch", str(missing), "--model", str(tiny_export)]) == 1
    assert f"{missing}: no such video file" in capsys.readouterr().err
    folder = tmp_path / "drop"
    folder.mkdir()
    unwritable = tmp_path / "no-such-dir" / "out.srt"
    assert main(["watch", str(folder), "--model", str(tiny_export), "--srt", str(unwritable)]) == 1
    err = capsys.readouterr().err
    assert f"cannot write {unwritable}" in err and "Traceback" not in err


def test_watch_rejects_a_non_positive_fps(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["watch", str(tmp_path), "--fps", "0"])
    assert info.value.code == 2 and "must be > 0" in capsys.readouterr().err
