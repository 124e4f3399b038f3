"""The runtime's tokens equal transformers generate() on the same weights and images."""

from __future__ import annotations

import numpy as np
import pytest

from tiny_models import CONFIGS

torch = pytest.importorskip("torch")

DECODING_CASES = [
    pytest.param(dict(num_beams=1), id="greedy"),
    pytest.param(dict(num_beams=1, repetition_penalty=1.3, no_repeat_ngram_size=2), id="greedy-penalties"),
    pytest.param(dict(num_beams=2), id="beam2"),
    pytest.param(dict(num_beams=3, no_repeat_ngram_size=2), id="beam3-ngram"),
    pytest.param(dict(num_beams=4, length_penalty=0.6), id="beam4-lp0.6"),
    pytest.param(dict(num_beams=4, length_penalty=1.5, no_repeat_ngram_size=3,
                      early_stopping=True), id="beam4-lp1.5-ngram-early"),
    pytest.param(dict(num_beams=3, early_stopping="never", min_new_tokens=4), id="beam3-never-min"),
]


def reference_tokens(hf_dir, images, eos, **options):
    from PIL import Image
    from transformers import ViTImageProcessor, VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(hf_dir).eval()
    processor = ViTImageProcessor.from_pretrained(hf_dir)
    pixels = processor([Image.open(p).convert("RGB") for p in images], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(pixels.pixel_values, max_new_tokens=10, **options)
    rows = []
    for row in out.tolist():
        row = row[1:]  # drop the decoder start token
        rows.append(row[: row.index(eos)] if eos in row else row)
    return rows


@pytest.mark.parametrize("config_name", [c.name for c in CONFIGS])
@pytest.mark.parametrize("options", DECODING_CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_tokens_equal_generate(tiny_exports, flickr_images, config_name, options, batch):
    from edgecap import Captioner

    hf_dir, export_dir = tiny_exports[config_name]
    captioner = Captioner(export_dir)
    images = flickr_images[:batch]
    expected = reference_tokens(hf_dir, images, captioner.manifest.eos_token_id, **options)
    results = captioner.caption(images, max_new_tokens=10, batch_size=batch, **options)
    assert [r.token_ids for r in results] == expected
    assert any(ids for ids in expected), "degenerate fixture: every caption is empty"


def test_preprocessing_matches_hf_processor(tiny_exports, flickr_images):
    from PIL import Image
    from transformers import ViTImageProcessor

    from edgecap.manifest import Manifest
    from edgecap.preprocess import load_image, preprocess_batch

    for name, (hf_dir, export_dir) in tiny_exports.items():
        processor = ViTImageProcessor.from_pretrained(hf_dir)
        config = Manifest.read(export_dir).preprocessing
        ours = preprocess_batch([load_image(p) for p in flickr_images], config)
        theirs = processor([Image.open(p).convert("RGB") for p in flickr_images],
                           return_tensors="np").pixel_values
        diff = float(np.max(np.abs(ours - theirs)))
        print(f"{name}: preprocessing max |diff| vs HF ViTImageProcessor = {diff:.2e}")
        assert ours.shape == theirs.shape
        assert diff < 1e-5


def test_export_records_parity_and_no_duplicate_embedding(tiny_exports):
    import onnx

    from edgecap.manifest import Manifest

    tied = {c.name: c.tied for c in CONFIGS}
    for name, (_, export_dir) in tiny_exports.items():
        manifest = Manifest.read(export_dir)
        assert manifest.provenance["parity"]["max_abs_logit_diff"] < 1e-3
        graph = onnx.load(str(export_dir / "decoder.onnx"), load_external_data=False).graph
        vocab_sized = [i.name for i in graph.initializer if manifest.vocab_size in i.dims]
        # Tied GPT-2 embeddings must be stored once; an untied head is a second, distinct matrix.
        assert len(vocab_sized) == (1 if tied[name] else 2), vocab_sized
        assert manifest.provenance["decoder_graph"] == "fused"


@pytest.fixture(scope="module")
def traced_exports(tiny_exports, tmp_path_factory):
    """The same tiny models exported with the traced (TorchScript) decoder step instead."""
    from edgecap.export.graphs.onnx_export import export_pretrained

    root = tmp_path_factory.mktemp("traced")
    exports = {}
    for name in (CONFIGS[1].name, CONFIGS[2].name):  # tied and untied heads
        hf_dir = tiny_exports[name][0]
        export_pretrained(hf_dir, root / name, fused=False)
        exports[name] = (hf_dir, root / name)
    return exports


@pytest.mark.parametrize("config_name", [CONFIGS[1].name, CONFIGS[2].name])
@pytest.mark.parametrize("options", [DECODING_CASES[0], DECODING_CASES[4]])
def test_traced_decoder_graph_also_equals_generate(traced_exports, flickr_images, config_name, options):
    from edgecap import Captioner
    from edgecap.manifest import Manifest

    hf_dir, export_dir = traced_exports[config_name]
    assert Manifest.read(export_dir).provenance["decoder_graph"] == "traced"
    captioner = Captioner(export_dir)
    images = flickr_images[:3]
    expected = reference_tokens(hf_dir, images, captioner.manifest.eos_token_id, **options)
    results = captioner.caption(images, max_new_tokens=10, batch_size=3, **options)
    assert [r.token_ids for r in results] == expected
