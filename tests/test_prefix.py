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


def test_manifest_says_prefix_and_records_parity(prefix_models):
    for cfg in PREFIX_CONFIGS:
        manifest = prefix_models[cfg.name][1].manifest
        assert manifest.conditioning == "prefix"
        assert manifest.prefix_length == cfg.prefix_length
        assert manifest.provenance["parity"]["max_abs_logit_diff"] < 1e-3


def test_wrong_prefix_shape_and_cross_attention_decoder_are_refused(tmp_path):
    from edgecap.export import export_prefix_captioner
    from edgecap.export.onnx_export import ExportError

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
