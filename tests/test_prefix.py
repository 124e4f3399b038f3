"""Prefix-conditioned captioners (ClipCap style): exported, then decoded by the same runtime.

The runtime's tokens equal ``GPT2LMHeadModel.generate(inputs_embeds=prefix)`` on the same
weights and real photos, for three tiny random models with prefixes of 1, 10 and 20 embeddings.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tiny_prefix_models import PREFIX_CONFIGS, build_prefix_model

# transformers' option names; the penalties and n-gram blocking see only generated tokens here
# (there is no start token before them), which the runtime must honour too.
DECODING_CASES = [
    pytest.param(dict(num_beams=1), id="greedy"),
    pytest.param(dict(num_beams=1, repetition_penalty=1.3, no_repeat_ngram_size=2), id="greedy-penalties"),
    pytest.param(dict(num_beams=2, length_penalty=0.6), id="beam2-lp0.6"),
    pytest.param(dict(num_beams=3, no_repeat_ngram_size=2, min_new_tokens=4), id="beam3-ngram-min"),
    pytest.param(dict(num_beams=4, length_penalty=1.5, no_repeat_ngram_size=3,
                      early_stopping=True), id="beam4-lp1.5-ngram-early"),
]


@pytest.fixture(scope="module")
def prefix_models(tmp_path_factory) -> dict:
    """name -> (torch parts, Captioner over their export)."""
    from edgecap import Captioner
    from edgecap.export import export_prefix_captioner

    root = tmp_path_factory.mktemp("prefix")
    models = {}
    for cfg in PREFIX_CONFIGS:
        encoder, mapper, gpt2, processor, tokenizer = build_prefix_model(cfg)
        export_prefix_captioner(encoder, mapper, gpt2, root / cfg.name, image_processor=processor,
                                tokenizer=tokenizer, prefix_length=cfg.prefix_length)
        models[cfg.name] = ((encoder, mapper, gpt2, processor), Captioner(root / cfg.name))
    return models


def reference_tokens(parts, images, eos: int, **options) -> list[list[int]]:
    from PIL import Image

    encoder, mapper, gpt2, processor = parts
    pixels = processor([Image.open(p).convert("RGB") for p in images], return_tensors="pt")
    with torch.no_grad():
        prefix = mapper(encoder(pixels.pixel_values))
        mask = torch.ones(prefix.shape[:2], dtype=torch.long)
        if prefix.shape[1] == 1:
            # transformers 4.57 tells generate()'s first step by len(cache_position) ==
            # inputs_embeds.shape[1], which holds at every step for one embedding: it would feed the
            # prefix again instead of each new token. One masked left pad (the usual batched-prompt
            # padding, which leaves the logits unchanged) keeps its first-step test honest.
            prefix = torch.cat([torch.zeros_like(prefix), prefix], dim=1)
            mask = torch.cat([torch.zeros_like(mask), mask], dim=1)
        out = gpt2.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=10,
                            do_sample=False, pad_token_id=eos, **options)
    # With inputs_embeds alone, generate() returns only the new tokens.
    return [row[: row.index(eos)] if eos in row else row for row in out.tolist()]


@pytest.mark.parametrize("config_name", [c.name for c in PREFIX_CONFIGS])
@pytest.mark.parametrize("options", DECODING_CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_tokens_equal_generate_with_inputs_embeds(prefix_models, flickr_images, config_name,
                                                  options, batch):
    parts, captioner = prefix_models[config_name]
    images = flickr_images[:batch]
    expected = reference_tokens(parts, images, captioner.manifest.eos_token_id, **options)
    results = captioner.caption(images, max_new_tokens=10, batch_size=batch, **options)
    assert [r.token_ids for r in results] == expected
    assert any(ids for ids in expected), "degenerate fixture: every caption is empty"


def test_images_finishing_at_different_steps_keep_their_own_prefix(prefix_models, flickr_images):
    """Six photos in one batch whose captions end at different steps: greedy drops finished
    images (their prefix K/V leave with them) and beam search reorders the other beams around
    each image's fixed prefix K/V; every caption still equals generate()'s."""
    parts, captioner = prefix_models["conv-mlp-p10"]
    for options in ({"num_beams": 1}, {"num_beams": 3, "no_repeat_ngram_size": 2}):
        expected = reference_tokens(parts, flickr_images, captioner.manifest.eos_token_id,
                                    **options)
        assert len({len(ids) for ids in expected}) > 1, "fixture: every caption has one length"
        results = captioner.caption(flickr_images, max_new_tokens=10, batch_size=6, **options)
        assert [r.token_ids for r in results] == expected


def _pixels(captioner, images):
    from edgecap.preprocess import load_image, preprocess_batch

    return preprocess_batch([load_image(p) for p in images], captioner.manifest.preprocessing)


def test_beams_read_one_prefix_kv_per_image(prefix_models, flickr_images):
    """The prefill leaves the prefix's K/V once per image; each row caches only its own tokens
    and beam reorders leave the prefix K/V as they are (the same arrays, never gathered)."""
    import numpy as np

    captioner = prefix_models["vit-attn-p20"][1]
    m, runner = captioner.manifest, captioner.runner
    state = runner.start(runner.encode(_pixels(captioner, flickr_images[:2])), repeats=3)
    prefix_kv = list(state.cross)
    assert len(prefix_kv) == 2 * m.num_layers
    assert {kv.shape for kv in prefix_kv} == {(2, m.num_heads, m.prefix_length, m.head_dim)}
    tokens = np.zeros(6, np.int64)
    for _ in range(3):  # the first step returns the prefill's logits and feeds nothing
        tokens = runner.step(state, tokens).argmax(axis=-1)
        runner.select(state, np.array([1, 0, 0, 5, 3, 4]), cross_too=False)
        tokens = tokens[[1, 0, 0, 5, 3, 4]]
    assert all(now is then for now, then in zip(state.cross, prefix_kv))
    assert {p.shape for p in state.past} == {(6, m.num_heads, 2, m.head_dim)}


def test_an_image_leaving_the_batch_takes_its_prefix_kv_along(prefix_models, flickr_images):
    """Greedy search drops finished images: the one left keeps its own prefix K/V and decodes
    exactly as it does alone."""
    import numpy as np

    captioner = prefix_models["vit-attn-p20"][1]
    runner = captioner.runner
    pixels = _pixels(captioner, flickr_images[:3])
    together, alone = runner.start(runner.encode(pixels)), runner.start(runner.encode(pixels[2:]))
    tokens = np.zeros(3, np.int64)
    for _ in range(2):
        tokens = runner.step(together, tokens).argmax(axis=-1)
        runner.step(alone, tokens[2:])
    runner.select(together, np.array([2]))
    for now, then in zip(together.cross, alone.cross):
        np.testing.assert_allclose(now, then, rtol=0, atol=1e-5)
    for _ in range(3):
        expected = runner.step(alone, tokens[2:])
        np.testing.assert_allclose(runner.step(together, tokens[2:]), expected, rtol=0, atol=1e-4)
        tokens = np.concatenate([tokens[:2], expected.argmax(axis=-1)])


def test_prefix_export_without_shared_prefix_kv_is_refused(prefix_models, tmp_path):
    """The earlier prefix layout (prefix inside every beam's cache) asks to be re-exported."""
    import json
    import shutil

    from edgecap import Captioner
    from edgecap.errors import ModelError

    old = tmp_path / "old"
    shutil.copytree(prefix_models["conv-mlp-p1"][1].model_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["shared_prefix_kv"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="re-export"):
        Captioner(old)


def test_manifest_says_prefix_and_records_parity(prefix_models):
    for cfg in PREFIX_CONFIGS:
        manifest = prefix_models[cfg.name][1].manifest
        assert manifest.conditioning == "prefix"
        assert manifest.prefix_length == cfg.prefix_length
        assert manifest.provenance["parity"]["max_abs_logit_diff"] < 1e-3


def test_wrong_prefix_shape_and_cross_attention_decoder_are_refused(tmp_path):
    from edgecap.export import export_prefix_captioner
    from edgecap.export.graphs.onnx_export import ExportError

    encoder, mapper, gpt2, processor, tokenizer = build_prefix_model(PREFIX_CONFIGS[0])
    with pytest.raises(ExportError, match="prefix_length=2"):
        export_prefix_captioner(encoder, mapper, gpt2, tmp_path / "a", image_processor=processor,
                                tokenizer=tokenizer, prefix_length=2)
    gpt2.config.add_cross_attention = True
    with pytest.raises(ExportError, match="cross-attention"):
        export_prefix_captioner(encoder, mapper, gpt2, tmp_path / "b", image_processor=processor,
                                tokenizer=tokenizer, prefix_length=1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_prefix_model_captions_with_torch_and_transformers_blocked(prefix_models, flickr_images):
    import json
    import subprocess
    import sys

    from test_runtime_isolation import BLOCKER

    captioner = prefix_models[PREFIX_CONFIGS[2].name][1]
    model, photos = str(captioner.model_dir), [str(p) for p in flickr_images[:2]]
    script = BLOCKER + f"""
import json
from edgecap import Captioner
captioner = Captioner({model!r})
results = captioner.caption({photos!r}, max_new_tokens=10, num_beams=3)
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {{'torch', 'transformers', 'onnx'}})
print(json.dumps({{'tokens': [r.token_ids for r in results], 'loaded': loaded}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    expected = captioner.caption(flickr_images[:2], max_new_tokens=10, num_beams=3)
    assert report["tokens"] == [r.token_ids for r in expected]


# ---------------------------------------------------------------- quantized prefix exports

INVARIANT_FORMATS = ["int8-dynamic", "int8-calibrated", "int4", "int8-block"]


@pytest.fixture(scope="module")
def prefix_formats(prefix_models, tmp_path_factory, sample_photos) -> dict:
    """name -> a quantized prefix export: int8-dynamic through export_prefix_captioner's own
    ``quantize=`` (per-row activations), calibrated int8-dynamic, int4 and int8-block (at
    width 64: at the 48-wide fixture ORT's MatMulNBits kernel gives different results from one
    session to the next) and fp16."""
    from edgecap.export import export_prefix_captioner
    from edgecap.export.quantize.variants import quantize_export

    root = tmp_path_factory.mktemp("prefix-formats")
    calibration = root / "calibration"
    calibration.mkdir()
    for photo in sample_photos(12)[8:]:  # not the photos under test
        (calibration / photo.name).write_bytes(photo.read_bytes())
    cfg = next(c for c in PREFIX_CONFIGS if c.name == "vit-attn-p20")
    (encoder, mapper, gpt2, processor), captioner = prefix_models[cfg.name]
    export_prefix_captioner(encoder, mapper, gpt2, root / "int8-dynamic", image_processor=processor,
                            tokenizer=captioner.model_dir / "tokenizer.json",
                            prefix_length=cfg.prefix_length, quantize="int8-dynamic")
    quantize_export(captioner.model_dir, root / "int8-calibrated", mode="int8-dynamic",
                    calibration=calibration, calibration_count=4)
    quantize_export(captioner.model_dir, root / "fp16", mode="fp16")
    wide = prefix_models["conv-mlp-p10"][1].model_dir
    for mode in ("int4", "int8-block"):
        quantize_export(wide, root / mode, mode=mode, block_size=16)
    return {name: root / name for name in [*INVARIANT_FORMATS, "fp16"]}


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("name", INVARIANT_FORMATS)
def test_quantized_prefix_exports_caption_each_image_the_same_in_any_batch(
        prefix_formats, sample_photos, name, num_beams):
    from edgecap import Captioner
    from test_batch_invariance import assert_same_tokens_in_any_batch

    captioner = Captioner(prefix_formats[name])
    quantization = captioner.manifest.quantization
    if name != "int8-block":  # which kernel quantizes per row in any case
        assert quantization["batch_invariant"] is True
    if name == "int8-calibrated":
        assert quantization["activations"]["decoder"] == "calibrated"
    assert_same_tokens_in_any_batch(captioner, sample_photos(8), num_beams, max_new_tokens=8)


def test_fp16_prefix_export_follows_fp32(prefix_models, prefix_formats, flickr_images):
    """fp16 weights and math: every step's logits stay near fp32's along the same tokens."""
    import numpy as np
    from edgecap import Captioner

    fp32 = prefix_models["vit-attn-p20"][1].runner
    fp16 = Captioner(prefix_formats["fp16"]).runner
    pixels = _pixels(Captioner(prefix_formats["fp16"]), flickr_images[:3])
    states = [r.start(r.encode(pixels), repeats=2) for r in (fp32, fp16)]
    tokens = np.zeros(6, np.int64)
    for _ in range(4):
        expected = fp32.step(states[0], tokens)
        got = fp16.step(states[1], tokens)
        np.testing.assert_allclose(got, expected, rtol=0, atol=0.005 * np.abs(expected).max())
        tokens = expected.argmax(axis=-1)
