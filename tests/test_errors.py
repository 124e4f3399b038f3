"""Missing or mismatched model files and unreadable images give typed errors and one-line CLI
messages with a non-zero exit, never tracebacks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgecap import Captioner, ImageError, ModelError
from edgecap.cli.main import main


@pytest.fixture
def model_copy(tiny_export, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_export, target)
    return target


def expect_model_error(model_dir: Path, *fragments: str) -> str:
    with pytest.raises(ModelError) as info:
        Captioner(model_dir)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_directory(tmp_path):
    expect_model_error(tmp_path / "nope", "not found")


def test_missing_manifest(model_copy):
    (model_copy / "manifest.json").unlink()
    expect_model_error(model_copy, "no manifest", "edgecap export")


def test_missing_decoder(model_copy):
    (model_copy / "decoder.onnx").unlink()
    expect_model_error(model_copy, "decoder.onnx", "missing model file")


def test_truncated_onnx(model_copy):
    data = (model_copy / "encoder.onnx").read_bytes()
    (model_copy / "encoder.onnx").write_bytes(data[: len(data) // 3])
    expect_model_error(model_copy, "encoder.onnx", "corrupt or truncated")


def test_git_lfs_pointer(model_copy):
    (model_copy / "decoder.onnx").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    expect_model_error(model_copy, "git lfs pull")


def test_unsupported_manifest_version(model_copy):
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    expect_model_error(model_copy, "format_version 99", "re-export")


def test_manifest_layer_count_mismatch(model_copy):
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["num_layers"] += 1
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    expect_model_error(model_copy, "different exports")


def test_tokenizer_vocabulary_mismatch(model_copy):
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["vocab_size"] = 10**6
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    expect_model_error(model_copy, "do not belong together")


def test_corrupt_tokenizer(model_copy):
    (model_copy / "tokenizer.json").write_text("{not json")
    expect_model_error(model_copy, "tokenizer")


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is text, not a picture", "not a supported image"),
])
def test_unreadable_images(tiny_export, tmp_path, content, reason):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    with pytest.raises(ImageError) as info:
        Captioner(tiny_export).caption(bad)
    assert str(bad) in str(info.value) and reason in str(info.value)


def test_truncated_jpeg(tiny_export, flickr_images, tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(flickr_images[0].read_bytes()[:2000])
    with pytest.raises(ImageError, match="truncated"):
        Captioner(tiny_export).caption(cut)


def test_cli_model_error_is_one_line(tmp_path, flickr_images, capsys):
    code = main(["caption", str(flickr_images[0]), "--model", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("edgecap: error:") and "\n" not in err and "Traceback" not in err


def test_cli_bad_image_gets_error_line_and_exit_1(tiny_export, flickr_images, tmp_path, capsys):
    missing = tmp_path / "missing.jpg"
    code = main(["caption", str(flickr_images[0]), str(missing), "--model", str(tiny_export), "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert [line["status"] for line in lines] == ["ok", "error"]
    assert lines[1]["source"] == str(missing) and "not found" in lines[1]["error"]


def test_invalid_options(tiny_export):
    from edgecap import OptionsError

    with pytest.raises(OptionsError):
        Captioner(tiny_export).caption(Path("x.jpg"), num_beams=0)
