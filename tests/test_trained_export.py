"""The CNN-encoder path (the default model's): a training checkpoint exports through the same
toolchain, and the runtime's tokens equal transformers generate() on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, mini_flickr) -> Path:
    from edgecap.export.train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "model"
    train(TrainConfig(mini_flickr, out, epochs=1, batch_size=8, lr=3e-3, warmup_steps=2,
                      n_layer=2, n_embd=64, n_head=4, max_train_images=8, dev_images=4,
                      patience=10, threads=2, max_steps=6, cache_dir=out.parent / "cache",
                      log_every=0, command_line="pytest"))
    return out


def test_export_trained_checkpoint_matches_generate(checkpoint, tmp_path, flickr_images, capsys):
    from edgecap import Captioner
    from edgecap.cli.main import main
    from edgecap.export.captioner_model import load_trained
    from edgecap.preprocess import load_image, preprocess_batch

    out = tmp_path / "export"
    assert main(["export-trained", str(checkpoint), str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["parity"]["max_abs_logit_diff"] < 1e-3
    captioner = Captioner(out)
    encoder, decoder, id_map = load_trained(checkpoint)
    images = flickr_images[:3]
    pixels = torch.from_numpy(preprocess_batch([load_image(p) for p in images],
                                               captioner.manifest.preprocessing))
    eos = captioner.manifest.eos_token_id
    # Trained with style tokens: default decoding describes, style="alt-text" starts from its own.
    assert captioner.manifest.styles == {"describe": 1, "alt-text": 2}
    assert captioner.manifest.decoder_start_token_id == 1
    cases = ((None, dict(num_beams=1)), (None, dict(num_beams=3, no_repeat_ngram_size=3)),
             ("alt-text", dict(num_beams=1)), ("alt-text", dict(num_beams=3)))
    for style, options in cases:
        with torch.no_grad():
            states = encoder(pixels)
            start = torch.full((len(images), 1), captioner.manifest.start_token(style))
            expected = decoder.generate(start, encoder_hidden_states=states, max_new_tokens=8,
                                        attention_mask=torch.ones_like(start), **options)
        rows = []
        for row in expected.tolist():
            row = row[1:]
            row = row[: row.index(eos)] if eos in row else row
            rows.append([id_map[t] for t in row])  # the runtime reports tokenizer (GPT-2) ids
        got = captioner.caption(images, max_new_tokens=8, style=style, **options)
        assert [r.token_ids for r in got] == rows, (style, options)


def test_unknown_style_is_a_usage_error_naming_the_known_ones(checkpoint, tmp_path, flickr_images,
                                                              capsys):
    from edgecap import Captioner
    from edgecap.cli.main import main
    from edgecap.errors import OptionsError

    out = tmp_path / "export"
    assert main(["export-trained", str(checkpoint), str(out)]) == 0
    with pytest.raises(OptionsError, match="'poem'.*describe, alt-text"):
        Captioner(out).caption(flickr_images[0], style="poem")
    capsys.readouterr()
    assert main(["caption", "--model", str(out), "--style", "poem", str(flickr_images[0])]) == 2
    assert "style 'poem'" in capsys.readouterr().err


def test_int8_export_of_checkpoint_loads_and_is_small(checkpoint, tmp_path, flickr_images):
    from edgecap import Captioner
    from edgecap.cli.main import main

    out = tmp_path / "int8"
    assert main(["export-trained", str(checkpoint), str(out), "--quantize", "int8-dynamic"]) == 0
    captioner = Captioner(out)
    assert captioner.manifest.quantization["mode"] == "int8-dynamic"
    assert captioner.manifest.quantization["bytes"] < 0.35 * captioner.manifest.quantization["fp32_bytes"]
    assert len(captioner.caption(flickr_images[:2])) == 2
