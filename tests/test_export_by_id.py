"""`edgecap export` takes a Hugging Face model id as well as a folder, offline from the local hub
cache, and the manifest it writes names the model without any private path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_models import CONFIGS, build_model

pytest.importorskip("torch")
pytest.importorskip("transformers")

MODEL_ID = "edgecap-test/tiny-captioner"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """A Hugging Face hub cache holding MODEL_ID (the layout from_pretrained downloads into),
    with the process pointed at it and offline. Returns the cache folder."""
    import huggingface_hub.constants as hub_constants
    import transformers.utils.hub as transformers_hub

    home = tmp_path / "hf-home"
    cache = home / "hub"
    repo = cache / ("models--" + MODEL_ID.replace("/", "--"))
    build_model(CONFIGS[0], repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read these variables once, at import, and this process imported them
    # before the test: point their copies at the tmp cache too.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(transformers_hub, "TRANSFORMERS_CACHE", str(cache))
    return cache


def string_values(value) -> list[str]:
    """Every string in a JSON tree (keys too), depth first."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *string_values(v)]]
    if isinstance(value, list):
        return [s for v in value for s in string_values(v)]
    return [value] if isinstance(value, str) else []


def assert_no_private_paths(manifest_file: Path, *private: Path) -> None:
    text = manifest_file.read_text()
    for folder in (*private, Path.home()):
        assert str(folder) not in text, f"{folder} leaked into {manifest_file.name}"
    absolute = [word for s in string_values(json.loads(text)) for word in s.split()
                if word.startswith(("/", "~")) or word[1:3] == ":\\"]
    assert not absolute, f"absolute paths in {manifest_file.name}: {absolute}"


def test_export_by_model_id_offline_captions(offline_hub, tmp_path, flickr_images, capsys):
    from edgecap import Captioner
    from edgecap.cli.main import main

    out = tmp_path / "export"
    assert main(["export", MODEL_ID, str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["parity"]["max_abs_logit_diff"] < 1e-3

    captioner = Captioner(out)
    provenance = captioner.manifest.provenance
    assert provenance["source"] == MODEL_ID and provenance["source_type"] == "model-id"
    assert provenance["revision"] == REVISION
    result = captioner.caption(flickr_images[0])
    assert result.token_ids and isinstance(result.text, str)
    assert_no_private_paths(out / "manifest.json", tmp_path, offline_hub)


def test_folder_export_records_folder_name_only(tiny_exports):
    from edgecap.manifest import Manifest

    hf_dir, export_dir = tiny_exports[CONFIGS[0].name]
    provenance = Manifest.read(export_dir).provenance
    assert provenance["source"] == hf_dir.name and provenance["source_type"] == "folder-name"
    assert_no_private_paths(export_dir / "manifest.json", hf_dir.parent, export_dir.parent)


@pytest.mark.parametrize("src, expected", [
    (MODEL_ID.replace("tiny", "missing"),
     "no model with this id in the local Hugging Face cache (offline: HF_HUB_OFFLINE is set)"),
    ("./no/such/folder", "no such folder (nor a Hugging Face model id"),
])
def test_unresolvable_source_is_one_line_error(offline_hub, tmp_path, capsys, src, expected):
    from edgecap.cli.main import main

    out = tmp_path / "export"
    assert main(["export", src, str(out)]) == 1
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith(f"edgecap: export failed: {src}: ")
    assert expected in printed[0]
    assert not out.exists()


def test_training_provenance_keeps_names_not_paths():
    from edgecap.export.train.trained_export import public_training_config

    recorded = {
        "data_dir": "/home/someone/data/flickr8k", "out_dir": "/scratch/run-3/model",
        "cache_dir": "/root/.cache/edgecap/features-lite0", "bpe_dir": None, "epochs": 8,
        "command_line": "/usr/bin/python3 -m edgecap.export.training --data /home/someone/data/"
                        "flickr8k --out /scratch/run-3/model --epochs 8",
        "preprocess": {"size": [224, 224]},
    }
    public = public_training_config(recorded)
    assert public["data_dir"] == "flickr8k" and public["out_dir"] == "model"
    assert public["cache_dir"] == "features-lite0" and public["bpe_dir"] is None
    assert public["command_line"] == ("python3 -m edgecap.export.training --data flickr8k "
                                      "--out model --epochs 8")
    assert public["epochs"] == 8 and public["preprocess"] == {"size": [224, 224]}
