"""Every quantization mode exports, loads without flags and captions; static int8 calibration is
deterministic for a fixed calibration set."""

from __future__ import annotations

import hashlib

import pytest

pytest.importorskip("torch")

from edgecap import Captioner  # noqa: E402
from edgecap.export.quantize.variants import quantize_export  # noqa: E402


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory, flickr_images):
    folder = tmp_path_factory.mktemp("calibration")
    for image in flickr_images[:4]:
        (folder / image.name).write_bytes(image.read_bytes())
    return folder


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-block", "int8-static", "int4", "fp16"])
def test_mode_exports_loads_and_captions(tiny_export, tmp_path, flickr_images, calibration_dir, mode):
    out = tmp_path / mode
    manifest = quantize_export(tiny_export, out, mode=mode, calibration=calibration_dir,
                               calibration_count=4, block_size=32)  # block: int4/int8-block; width 32
    assert manifest.quantization["mode"] == mode
    captioner = Captioner(out)  # no flags: the manifest says what it is
    assert captioner.manifest.quantization["mode"] == mode
    reference = Captioner(tiny_export).caption(flickr_images[:3], num_beams=2)
    results = captioner.caption(flickr_images[:3], num_beams=2)
    assert len(results) == 3 and all(r.token_ids for r in results)
    agreement = sum(a.token_ids == b.token_ids for a, b in zip(reference, results))
    print(f"{mode}: {agreement}/3 captions identical to fp32, "
          f"{manifest.quantization['bytes']} bytes vs {manifest.quantization['fp32_bytes']} fp32")
    if mode.startswith("int8") or mode == "int4":
        assert manifest.quantization["bytes"] < 0.5 * manifest.quantization["fp32_bytes"]
    if mode == "int8-static":
        assert manifest.quantization["calibration"]["images"] == sorted(
            p.name for p in calibration_dir.iterdir())


def test_int8_block_rows_do_not_influence_each_other(tiny_export, tmp_path, flickr_test_images):
    """int8-block quantizes activations per row (and block): an image's tokens and logits are
    the same captioned alone or in a batch, in the encoder and in every decoder step."""
    import numpy as np
    import onnx

    from edgecap.decoding import greedy_search
    from edgecap.preprocess import load_image, preprocess_batch

    out = tmp_path / "int8-block"
    quantize_export(tiny_export, out, mode="int8-block", block_size=16)
    encoder, decoder = ({n.op_type for n in onnx.load(str(out / graph)).graph.node}
                        for graph in ("encoder.onnx", "decoder.onnx"))
    # The encoder is int8-dynamic's, scaled per row; the decoder's matmuls are 8-bit blocks.
    assert "MatMulIntegerToFloat" in encoder and "MatMulNBits" not in encoder
    assert "MatMulNBits" in decoder and not decoder & {"MatMulIntegerToFloat", "MatMulInteger"}
    assert not (encoder | decoder) & {"DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    captioner = Captioner(out)
    runner, m = captioner.runner, captioner.manifest
    pixels = preprocess_batch([load_image(p) for p in flickr_test_images], m.preprocessing)
    alone = [runner.encode(pixels[i : i + 1]) for i in range(len(pixels))]
    together = runner.encode(pixels)
    for i, cross in enumerate(alone):
        for single, batched in zip(cross, together):
            np.testing.assert_allclose(batched[i : i + 1], single, rtol=0, atol=1e-6)
    stacked = [np.concatenate(parts) for parts in zip(*alone)]
    options = captioner.options(num_beams=1, max_new_tokens=12)
    batched = greedy_search(runner, stacked, options, m.decoder_start_token_id, m.eos_token_id)
    singles = [greedy_search(runner, cross, options, m.decoder_start_token_id, m.eos_token_id)[0]
               for cross in alone]
    assert [h.token_ids for h in batched] == [h.token_ids for h in singles]
    state = runner.start(stacked)
    tokens = np.full(len(alone), m.decoder_start_token_id)
    logits = runner.step(state, tokens)
    for i, cross in enumerate(alone):
        single = runner.step(runner.start(cross), tokens[:1])
        np.testing.assert_allclose(logits[i : i + 1], single, rtol=0, atol=1e-5)


def test_int8_dynamic_stores_embedding_once(tiny_export, tmp_path):
    import onnx

    out = tmp_path / "q"
    manifest = quantize_export(tiny_export, out, mode="int8-dynamic")
    graph = onnx.load(str(out / "decoder.onnx")).graph
    vocab_sized = [(i.name, i.data_type) for i in graph.initializer if manifest.vocab_size in i.dims]
    assert len(vocab_sized) == 1 and vocab_sized[0][1] == onnx.TensorProto.INT8, vocab_sized


def test_int4_gathers_tokens_from_the_heads_packed_matrix(tiny_export, tmp_path):
    """The lookup reads the LM head's 4-bit rows: no float table left, and the gathered vectors
    equal the packed matrix dequantized by hand (MatMulNBits layout) and the fp32 embedding to
    within one quantization step (measured worst: 0.66 of a step)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    out = tmp_path / "int4"
    manifest = quantize_export(tiny_export, out, mode="int4", block_size=16)
    model = onnx.load(str(out / "decoder.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert "output_embedding" not in inits
    vocab_sized = [name for name, a in inits.items() if manifest.vocab_size in a.shape]
    assert sorted(vocab_sized) == ["output_embedding_Q4", "output_embedding_gather_scales",
                                   "output_embedding_scales"]
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")

    ids = np.array([[0], [7], [manifest.vocab_size - 1]], np.int64)
    graph = helper.make_graph(
        [helper.make_node("GatherBlockQuantized", [lookup.input[0], "ids", lookup.input[2]], ["rows"],
                          domain="com.microsoft", **{a.name: helper.get_attribute_value(a)
                                                     for a in lookup.attribute})],
        "lookup", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [3, 1])],
        [helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, None)],
        [i for i in model.graph.initializer if i.name in lookup.input])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    gathered = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0].reshape(3, -1)

    packed, scales = inits["output_embedding_Q4"], inits["output_embedding_scales"]
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], packed.shape[1], -1)
    by_hand = ((nibbles.astype(np.float32) - 8) * scales[..., None]).reshape(packed.shape[0], -1)
    np.testing.assert_allclose(gathered, by_hand[ids[:, 0]], rtol=0, atol=1e-6)

    fp32 = onnx.load(str(tiny_export / "decoder.onnx"))
    table = next(numpy_helper.to_array(i) for i in fp32.graph.initializer if i.name == "output_embedding")
    step = np.abs(np.repeat(scales[ids[:, 0]], 16, axis=1))  # the quantizer may pick negative scales
    error = np.abs(gathered - table[:, ids[:, 0]].T)
    assert np.all(error <= step + 1e-6), float(np.max(error / step))


def test_block_size_defaults_to_the_largest_that_divides_the_width(tiny_export, tmp_path):
    """Width 32: int8-block and int4 both take 32-wide blocks; at GPT-2's 768, each takes the
    longest block its kernel sums alike in any batch: 64 for 8 bits, 32 for 4."""
    from edgecap.export.quantize.variants import default_block_size

    assert (default_block_size("int8-block", 768), default_block_size("int4", 768)) == (64, 32)
    assert default_block_size("int8-block", 384) == 64 and default_block_size("int4", 48) == 16
    manifest = quantize_export(tiny_export, tmp_path / "q", mode="int8-block")
    assert manifest.quantization["block_size"] == 32


def test_int4_block_must_divide_the_width(tiny_export, tmp_path):
    with pytest.raises(ValueError, match="block size 128 does not divide the decoder width 32; "
                                         "use --block-size 32"):
        quantize_export(tiny_export, tmp_path / "q", mode="int4", block_size=128)
    with pytest.raises(ValueError, match="block size 0 unsupported"):  # 0 is no default
        quantize_export(tiny_export, tmp_path / "q", mode="int4", block_size=0)
    assert not (tmp_path / "q").exists()


def test_the_block_size_hint_is_a_batch_invariant_block():
    from edgecap.export.quantize.variants import check_block_size

    with pytest.raises(ValueError, match="use --block-size 32$"):
        check_block_size("int4", 256, 384)  # 128 divides 384 too, but int4 sums it batch-wise


def test_static_calibration_is_deterministic(tiny_export, tmp_path, calibration_dir):
    digests = []
    for attempt in range(2):
        out = tmp_path / f"static-{attempt}"
        quantize_export(tiny_export, out, mode="int8-static", calibration=calibration_dir,
                        calibration_count=4)
        digests.append(tuple(hashlib.sha256((out / f).read_bytes()).hexdigest()
                             for f in ("encoder.onnx", "decoder.onnx")))
    assert digests[0] == digests[1]


def test_requantizing_is_refused(tiny_export, tmp_path):
    quantize_export(tiny_export, tmp_path / "q", mode="int8-dynamic")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_export(tmp_path / "q", tmp_path / "qq", mode="int8-dynamic")


def test_static_without_calibration_folder_fails(tiny_export, tmp_path):
    with pytest.raises(ValueError, match="--calibration"):
        quantize_export(tiny_export, tmp_path / "s", mode="int8-static")


def test_lm_head_can_stay_float(tiny_export, tmp_path, flickr_images):
    import onnx

    out = tmp_path / "keep"
    manifest = quantize_export(tiny_export, out, mode="int8-dynamic", exclude_nodes=("lm_head",))
    graph = onnx.load(str(out / "decoder.onnx")).graph
    float_heads = [n for n in graph.node if n.op_type == "MatMul" and "output_embedding" in n.input]
    assert len(float_heads) == 1 and manifest.quantization["excluded_nodes"] == ["lm_head"]
    assert Captioner(out).caption(flickr_images[0]).token_ids


def test_a_manifest_says_batch_invariant_only_up_to_the_bit_exact_block():
    from edgecap.export.quantize.batch_invariant import bit_exact_block

    assert bit_exact_block({"mode": "int4", "block_size": 32})
    assert not bit_exact_block({"mode": "int4", "block_size": 128})
    assert bit_exact_block({"mode": "int8-block", "block_size": 64})
    assert not bit_exact_block({"mode": "int8-block", "block_size": 256})


@pytest.mark.parametrize(("mode", "bits"), [("int8-block", 8), ("int4", 4)])
def test_block_kernel_gives_a_row_the_same_result_in_any_batch(mode, bits):
    """The block size each block mode picks for a GPT-2-wide decoder is one where ONNX Runtime's
    kernel treats a row alone, in a pair, or left over at the end of an odd batch bit for bit
    alike (with longer blocks the leftover row is summed in another order on AVX512-VNNI CPUs)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from edgecap.export.quantize.variants import default_block_size

    k, n = 768, 320
    block = default_block_size(mode, k)
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (n, k // block, block * bits // 8), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, n * (k // block)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=block, accuracy_level=4)
    graph = helper.make_graph(
        [node], "block8", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rows = rng.standard_normal((9, k)).astype(np.float32)
    alone = np.concatenate([session.run(None, {"x": rows[i : i + 1]})[0] for i in range(9)])
    for count in range(2, 10):
        np.testing.assert_array_equal(session.run(None, {"x": rows[:count]})[0], alone[:count])


def test_int8_block_follows_fp32_where_fp32_is_decided(tiny_export, tmp_path, flickr_images):
    """Along fp32's own greedy tokens, int8-block's logits stay near fp32's, and at every step
    where fp32's best token leads the runner-up by more than twice that distance, int8-block
    picks the same token (random tiny weights give flat logits, so near-ties may differ)."""
    import numpy as np

    from edgecap.preprocess import load_image, preprocess_batch

    out = tmp_path / "int8-block"
    quantize_export(tiny_export, out, mode="int8-block")
    fp32, block = Captioner(tiny_export), Captioner(out)
    pixels = preprocess_batch([load_image(p) for p in flickr_images], fp32.manifest.preprocessing)
    runners = (fp32.runner, block.runner)
    states = [r.start(r.encode(pixels)) for r in runners]
    tokens = np.full(len(pixels), fp32.manifest.decoder_start_token_id)
    decided = 0
    for _ in range(8):
        reference, quantized = (r.step(s, tokens) for r, s in zip(runners, states))
        distance = np.abs(quantized - reference).max(axis=1)
        assert distance.max() < 0.05 * np.abs(reference).max(), float(distance.max())
        ranked = np.sort(reference, axis=1)
        margin = ranked[:, -1] - ranked[:, -2]
        clear = margin > 2 * distance
        assert np.array_equal(quantized.argmax(1)[clear], reference.argmax(1)[clear])
        decided += int(clear.sum())
        tokens = reference.argmax(axis=1)
    assert decided >= len(pixels) * 4  # most steps are decided, so the check has teeth


def test_quality_report_compares_int8_block_with_fp32(tiny_export, tmp_path, flickr_images):
    from edgecap.export.quantize.quality_report import markdown, quality_report

    out = tmp_path / "int8-block"
    quantize_export(tiny_export, out, mode="int8-block")
    report = quality_report(tiny_export, out, flickr_images[:4], None,
                            {"num_beams": 2, "max_new_tokens": 6}, latency_reps=5)
    assert report["mode"] == "int8-block" and report["images"] == 4
    assert report["invariant_at_8"] == {"fp32": 1.0, "quantized": 1.0}
    assert 0 <= report["identical_captions"] <= report["mean_token_agreement"] <= 1
    assert report["size_ratio"] < 0.5 and report["speedup"]["decoder_step"] > 0
    assert "| int8-block vs fp32 (4 images, beams 2) | value |" in markdown(report)
