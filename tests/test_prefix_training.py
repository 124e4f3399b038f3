"""`edgecap train --arch prefix`: a few steps of the ClipCap-style family on the mini Flickr8k
folder built from the photos in tests/data, exported with `edgecap export-trained`, then
captioning real JPEGs through the runtime with the tokens transformers generates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("efficientnet_lite_pytorch")

PREFIX_LENGTH = 4
TINY_ARGS = ["--arch", "prefix", "--prefix-length", str(PREFIX_LENGTH), "--mapper-layers", "1",
             "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
             "--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--max-train-images", "8",
             "--dev-images", "4", "--patience", "10", "--threads", "2", "--log-every", "0"]


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory, mini_flickr) -> Path:
    from edgecap.cli.main import main

    root = tmp_path_factory.mktemp("prefix-run")
    out = root / "run"
    assert main(["train", "--data", str(mini_flickr), "--out", str(out),
                 "--cache-dir", str(root / "features"), *TINY_ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def prefix_export(prefix_run, tmp_path_factory) -> Path:
    from edgecap.cli.main import main

    out = tmp_path_factory.mktemp("prefix-export") / "fp32"
    assert main(["export-trained", str(prefix_run), str(out)]) == 0
    return out


def test_prefix_run_trains_and_records_its_family(prefix_run):
    from edgecap.export.captioner_model import PrefixEncoder, load_trained

    log = [json.loads(line) for line in (prefix_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["dev_loss"]) for r in log)
    assert log[1]["train_loss"] < log[0]["train_loss"]
    config = json.loads((prefix_run / "train_config.json").read_text())
    assert (config["arch"], config["prefix_length"]) == ("prefix", PREFIX_LENGTH)
    assert json.loads((prefix_run / "encoder.json").read_text())["arch"] == "prefix"

    encoder, decoder, id_map = load_trained(prefix_run)
    assert isinstance(encoder, PrefixEncoder) and not decoder.config.add_cross_attention
    feats = torch.randn(2, 49, 1280)
    with torch.no_grad():
        assert encoder.project(feats).shape == (2, PREFIX_LENGTH, 64)
    assert len(id_map) == decoder.config.vocab_size


def test_export_trained_prefix_captions_like_generate(prefix_run, prefix_export, photos):
    from edgecap import Captioner
    from edgecap.export.captioner_model import load_trained
    from edgecap.preprocess import load_image, preprocess_batch

    captioner = Captioner(prefix_export)
    manifest = captioner.manifest
    # The style token (describe) rides at the end of the prefix: the runtime feeds no start token.
    assert (manifest.conditioning, manifest.prefix_length) == ("prefix", PREFIX_LENGTH + 1)
    assert manifest.id_map_file == "id_map.json"
    assert manifest.provenance["training"]["arch"] == "prefix"

    encoder, decoder, id_map = load_trained(prefix_run)
    images = photos[:3]
    pixels = torch.from_numpy(preprocess_batch([load_image(p) for p in images],
                                               manifest.preprocessing))
    start = decoder.generation_config.decoder_start_token_id
    for options in ({"num_beams": 1}, {"num_beams": 3, "no_repeat_ngram_size": 3}):
        with torch.no_grad():
            prefix = encoder(pixels)
            starts = decoder.transformer.wte(torch.full((len(images), 1), start))
            out = decoder.generate(inputs_embeds=torch.cat([prefix, starts], dim=1),
                                   max_new_tokens=8, do_sample=False, pad_token_id=0,
                                   **options)
        expected = [[id_map[t] for t in (row[: row.index(0)] if 0 in row else row)]
                    for row in out.tolist()]
        got = captioner.caption(images, max_new_tokens=8, **options)
        assert [r.token_ids for r in got] == expected, options
        assert all("<|" not in r.text for r in got)


def test_int8_prefix_export_with_calibration_captions_a_jpeg(prefix_run, tmp_path, photos,
                                                            capsys):
    from edgecap import Captioner
    from edgecap.cli.main import main

    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for photo in photos:
        (calibration / photo.name).symlink_to(photo)
    out = tmp_path / "int8"
    assert main(["export-trained", str(prefix_run), str(out), "--quantize", "int8-dynamic",
                 "--calibration", str(calibration)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quantization"] == \
        "int8-dynamic"
    captioner = Captioner(out)
    assert captioner.manifest.conditioning == "prefix"
    result = captioner.caption(photos[0], max_new_tokens=8)
    assert result.text.strip() and "<|" not in result.text


def test_resume_refuses_another_family(prefix_run):
    import dataclasses

    from edgecap.export.train.loop import TrainConfig, train

    recorded = json.loads((prefix_run / "train_config.json").read_text())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in recorded.items() if k in fields}
    with pytest.raises(ValueError, match="^--resume: arch differ"):
        train(TrainConfig(**{**settings, "arch": "cross-attention", "resume": True}))
