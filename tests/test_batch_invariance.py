"""Same image, same caption: an image's tokens are identical captioned alone and in batches of any
size and composition, greedy and beam, for every format export writes and for the shipped model."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgecap import Captioner
from edgecap.captioner import default_model_dir
from edgecap.preprocess import load_image, preprocess_batch

PHOTOS = 16
BATCHES = (3, 8)


def assert_same_tokens_in_any_batch(
    captioner: Captioner, photos: list[Path], num_beams: int, max_new_tokens: int
) -> None:
    """Each photo alone, then all of them shuffled into batches of 3 and of 8: same tokens."""
    options = {"num_beams": num_beams, "max_new_tokens": max_new_tokens}
    alone = {p: captioner.caption([p], batch_size=1, **options)[0].token_ids for p in photos}
    assert any(len(tokens) > 1 for tokens in alone.values())  # captions, not just an EOS
    rng = random.Random(num_beams)
    for batch_size in BATCHES:
        order = photos[:]
        rng.shuffle(order)
        results = captioner.caption(order, batch_size=batch_size, **options)
        changed = [p.name for p, r in zip(order, results) if r.token_ids != alone[p]]
        assert not changed, f"batch {batch_size}, beams {num_beams}: captions changed for {changed}"


def assert_rows_bitwise_independent(
    captioner: Captioner, photos: list[Path], logits_atol: float = 0.0
) -> None:
    """Stronger than equal tokens: the encoder output and first-step logits of each image are
    bit-identical alone and in a batch (a shared scale would perturb them slightly).

    ``logits_atol``: int4's 4-bit kernel sums in a different order for one row than for many
    (float rounding only, about 1e-6 here); every other format is bit-exact."""
    runner, m = captioner.runner, captioner.manifest
    pixels = preprocess_batch([load_image(p) for p in photos], m.preprocessing)
    together = runner.encode(pixels)
    alone = [runner.encode(pixels[i : i + 1]) for i in range(len(pixels))]
    for i, single in enumerate(alone):
        for one, batched in zip(single, together):
            np.testing.assert_array_equal(batched[i : i + 1], one)
    tokens = np.full(len(photos), m.decoder_start_token_id)
    logits = runner.step(runner.start(together), tokens)
    for i, single in enumerate(alone):
        single_logits = runner.step(runner.start(single), tokens[:1])
        np.testing.assert_allclose(logits[i : i + 1], single_logits, rtol=0, atol=logits_atol)


@pytest.fixture(scope="module")
def photos(sample_photos) -> list[Path]:
    return sample_photos(PHOTOS)


@pytest.fixture(scope="module")
def tiny_formats(tiny_export, tmp_path_factory, sample_photos) -> dict[str, Path]:
    """The tiny model in fp32 and in each format whose invariance is under test."""
    pytest.importorskip("torch")
    from edgecap.export.quantize.variants import quantize_export

    root = tmp_path_factory.mktemp("formats")
    calibration = root / "calibration"
    calibration.mkdir()
    for photo in sample_photos(20)[PHOTOS:]:  # not the photos under test
        (calibration / photo.name).write_bytes(photo.read_bytes())
    formats = {"fp32": tiny_export}
    for name, mode, folder in (
        ("int8", "int8-dynamic", calibration),
        ("int8-uncalibrated", "int8-dynamic", None),
        ("int8-per-row-encoder", "int8-dynamic", calibration),
        ("int4", "int4", None),
        ("int8-block", "int8-block", calibration),
        ("int8-block-uncalibrated", "int8-block", None),
    ):
        quantize_export(
            tiny_export,
            root / name,
            mode=mode,
            calibration=folder,
            calibration_count=4,
            block_size=32,
            calibrate_encoder=False if name == "int8-per-row-encoder" else None,
        )
        formats[name] = root / name
    return formats


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("name", ["fp32", "int8", "int8-uncalibrated", "int8-per-row-encoder",
                                  "int4", "int8-block", "int8-block-uncalibrated"])
def test_tiny_formats_caption_each_image_the_same_in_any_batch(
    tiny_formats, photos, name, num_beams
):
    captioner = Captioner(tiny_formats[name])
    assert_same_tokens_in_any_batch(captioner, photos, num_beams, max_new_tokens=8)
    if num_beams == 1:
        assert_rows_bitwise_independent(captioner, photos[:5], 1e-4 if name == "int4" else 0.0)


def test_int8_has_no_activation_scale_shared_across_rows(tiny_formats):
    """DynamicQuantizeLinear (one scale per tensor, i.e. per batch) is gone from both graphs."""
    for name in ("int8", "int8-uncalibrated", "int4", "int8-block", "int8-block-uncalibrated"):
        manifest = Captioner(tiny_formats[name]).manifest
        assert manifest.quantization["batch_invariant"] is True
        for graph in ("encoder.onnx", "decoder.onnx"):
            ops = {n.op_type for n in onnx.load(str(tiny_formats[name] / graph)).graph.node}
            assert "DynamicQuantizeLinear" not in ops, (name, graph)
    assert (
        Captioner(tiny_formats["int8"]).manifest.quantization["activations"]["decoder"]
        == "calibrated"
    )
    # With calibration images the encoder is calibrated too (the fastest invariant format),
    # unless per-row encoder scales are asked for; without them it is per row.
    for name, encoder in (("int8", "calibrated"), ("int8-per-row-encoder", "per-row"),
                          ("int8-uncalibrated", "per-row"), ("int8-block", "calibrated"),
                          ("int8-block-uncalibrated", "per-row")):
        activations = Captioner(tiny_formats[name]).manifest.quantization["activations"]
        assert activations["encoder"] == encoder, name


@pytest.mark.parametrize("num_beams", [1, 3])
def test_shipped_model_captions_each_image_the_same_in_any_batch(photos, num_beams):
    captioner = Captioner(default_model_dir())
    assert_same_tokens_in_any_batch(captioner, photos, num_beams, max_new_tokens=20)
    if num_beams == 1:
        assert_rows_bitwise_independent(captioner, photos[:8])


def test_serve_burst_returns_what_caption_prints(photos, capsys):
    """A concurrent burst is micro-batched by `edgecap serve`; each image still gets exactly the
    caption `edgecap caption IMG` prints for it alone."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from concurrent.futures import ThreadPoolExecutor

    from edgecap.cli.main import main
    from test_server import Server, request

    printed = {}
    for photo in photos:
        assert main(["caption", str(photo)]) == 0
        printed[photo] = capsys.readouterr().out.strip()
    server = Server(default_model_dir(), "--max-wait-ms", "50")
    try:
        with ThreadPoolExecutor(len(photos)) as pool:
            replies = list(
                pool.map(lambda p: request(server.url + "/v1/captions", p.read_bytes()), photos * 2)
            )
        metrics = request(server.url + "/metrics")[1]
    finally:
        assert server.stop() == 0
    assert all(status == 200 for status, _, _ in replies)
    served = [body["generated_text"] for _, body, _ in replies]
    assert served == [printed[p] for p in photos * 2]
    batched = [line for line in metrics.splitlines() if line.startswith("edgecap_batch_size_count")]
    singles = [
        line
        for line in metrics.splitlines()
        if line.startswith('edgecap_batch_size_bucket{le="1.0"}')
    ]
    assert float(batched[0].split()[-1]) < len(photos) * 2, "the burst was never batched"
    print(f"{len(replies)} requests in {batched[0].split()[-1]} batches ({singles})")


def test_existing_per_tensor_export_converts_in_place(tiny_export, tmp_path, sample_photos):
    """The rewrite that converted the shipped model: a per-tensor int8-dynamic export (as ORT's
    quantize_dynamic writes it) becomes batch-invariant in place, weights untouched; with
    ``calibrate_encoder`` both graphs get fixed scales."""
    pytest.importorskip("torch")
    from unittest import mock

    from edgecap.export.quantize import variants as quantize
    from edgecap.export.quantize.batch_invariant import make_batch_invariant
    from edgecap.manifest import Manifest

    per_tensor = tmp_path / "per-tensor"
    with mock.patch.object(
        quantize, "_batch_invariant", lambda staging, *_: Manifest.read(staging)
    ):
        quantize.quantize_export(tiny_export, per_tensor, mode="int8-dynamic")
    assert "DynamicQuantizeLinear" in {
        n.op_type for n in onnx.load(str(per_tensor / "decoder.onnx")).graph.node
    }
    photos, calibration = sample_photos(12)[:8], sample_photos(12)[8:]
    for calibrate_encoder in (False, True):
        converted = tmp_path / f"converted-{calibrate_encoder}"
        shutil.copytree(per_tensor, converted)
        record = make_batch_invariant(converted, calibration, calibrate_encoder=calibrate_encoder)
        assert record["decoder"] == "calibrated"
        assert record["encoder"] == ("calibrated" if calibrate_encoder else "per-row")
        assert_rows_bitwise_independent(Captioner(converted), photos)
