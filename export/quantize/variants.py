"""Quantized variants of an fp32 export: int8-dynamic, int8-block, int8-static (calibrated),
int4 and fp16.

* int8-dynamic: int8 weights for every MatMul (and the encoder's convolutions), activations
  quantized on the fly. The decoder step reads every weight once per token, so int8 weights cut
  the bytes it moves by 4x. Batch-invariant (batch_invariant.py): encoder activations are
  quantized per row; decoder activations per row, or, with ``calibration``, with fixed scales
  calibrated on those images (the fast choice). ORT's own dynamic quantization shares one
  scale per tensor, i.e. across the batch, and captions then depended on their batch.
* int8-block: the decoder's MatMul weights as 8-bit blocks (``MatMulNBits``, symmetric, one
  scale per ``block_size`` inputs), the encoder as in int8-dynamic. The 8-bit kernel quantizes
  activations per row and block inside itself, so the decoder needs no calibration to be
  batch-invariant (at the default block sizes, see ``BIT_EXACT_BLOCK``). It is slower than
  int8-dynamic's calibrated integer matmul with many rows per step and only a little faster at
  one row (docs/quantization.md). The encoder is int8-dynamic's: its many rows per image are exactly
  where that kernel wins.
* int8-static: weights and activations int8 (QDQ), scales calibrated on a folder of images
  (encoder) and on the decoder steps those images produce; deterministic for a fixed set.
* int4: the decoder's MatMul weights as 4-bit blocks (``MatMulNBits``, symmetric, one scale per
  ``block_size`` inputs), activations quantized to int8 inside the kernel; the encoder as in
  int8-dynamic. A greedy step reads every decoder weight once per token, so halving the bytes
  again over int8 is what speeds up decoding on a CPU.
* fp16: weights and math in float16 with float32 inputs/outputs kept, for GPU providers.

The tied token embedding is one [width, vocab] matrix used by the LM head (MatMul) and the input
lookup (Gather). After int8 quantization the lookup is rewired to gather from the int8 copy and
dequantize the picked columns, so the fp32 matrix is not stored a second time.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from edgecap.manifest import Manifest
from onnx import helper, numpy_helper

from .batch_invariant import BIT_EXACT_BLOCK
from .calibration import calibration_images

log = logging.getLogger("edgecap.export")

MODES = ("none", "int8-dynamic", "int8-block", "int8-static", "int4", "fp16")
BLOCK_MODES = {"int4": 4, "int8-block": 8}  # MatMulNBits modes and their bits per weight
CALIBRATED_ENCODER_MODES = ("int8-dynamic", "int8-block")  # modes whose encoder can calibrate
BLOCK_SIZES = (16, 32, 64, 128, 256)  # the MatMulNBits block sizes ONNX Runtime supports


def quantize_export(src: str | Path, out: str | Path, *, mode: str, calibration: Path | None = None,
                    calibration_count: int = 64, exclude_nodes: tuple[str, ...] = (),
                    quantize_encoder: bool = True, block_size: int | None = None,
                    calibrate_encoder: bool | None = None) -> Manifest:
    """Write a ``mode`` version of the fp32 export ``src`` into ``out`` (may equal ``src``).

    Args:
        calibration: int8-static (required); int8-dynamic and int8-block (optional): a folder
            of representative images that fixes the encoder's activation scales (and
            int8-dynamic's decoder's) instead of scaling each row on its own.
        block_size: int4 and int8-block: weights per scale along the input dimension; default
            ``default_block_size``.
        exclude_nodes: node names (or name prefixes) kept in float, e.g. "/MatMul_LM" for the head.
        quantize_encoder: False keeps the encoder graph in fp32 (quantize only the decoder).
        calibrate_encoder: int8-dynamic or int8-block with ``calibration``: fixed calibrated
            activation scales in the encoder (the default then: the fastest invariant format),
            or False for per-row encoder scales. Without ``calibration`` the encoder is per row.
    """
    if calibrate_encoder is None:
        calibrate_encoder = mode in CALIBRATED_ENCODER_MODES and calibration is not None
    src, out = Path(src), Path(out)
    manifest, block_size = _checked_source(src, mode, calibration, calibrate_encoder, block_size)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        encoder_in, decoder_in = src / manifest.encoder_file, src / manifest.decoder_file
        info = _write_graphs(src, encoder_in, decoder_in, staging, mode, calibration=calibration,
                             calibration_count=calibration_count, exclude_nodes=exclude_nodes,
                             quantize_encoder=quantize_encoder, block_size=block_size)
        if exclude_nodes:
            info["excluded_nodes"] = list(exclude_nodes)
        if not quantize_encoder:
            info["encoder"] = "fp32"
        for name in manifest.companion_files():
            if (src / name).is_file():
                shutil.copyfile(src / name, staging / name)
        info["fp32_bytes"] = _size(encoder_in) + _size(decoder_in)
        info["bytes"] = _size(staging / "encoder.onnx") + _size(staging / "decoder.onnx")
        result = dataclasses.replace(manifest, quantization=info, encoder_file="encoder.onnx",
                                     decoder_file="decoder.onnx")
        result.write(staging)
        if mode in ("int8-dynamic", "int8-block", "int4"):
            result = _batch_invariant(staging, mode, calibration, calibration_count,
                                      calibrate_encoder)
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            shutil.copyfile(item, out / item.name)
    log.info("%s: %.1f MB -> %.1f MB", mode, info["fp32_bytes"] / 1e6, info["bytes"] / 1e6)
    return result


def _checked_source(src: Path, mode: str, calibration: Path | None, calibrate_encoder: bool,
                    block_size: int | None) -> tuple[Manifest, int | None]:
    """The manifest of ``src`` and the block size to use (``default_block_size`` if None);
    ValueError (saying what to change) for a request that cannot be met."""
    if calibrate_encoder and (mode not in CALIBRATED_ENCODER_MODES or calibration is None):
        raise ValueError("calibrate_encoder needs mode int8-dynamic or int8-block and a "
                         "calibration folder")
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose from {MODES}")
    manifest = Manifest.read(src)
    if mode in BLOCK_MODES:
        width = manifest.num_heads * manifest.head_dim
        block_size = default_block_size(mode, width) if block_size is None else block_size
        check_block_size(mode, block_size, width)
    if manifest.quantization.get("mode", "none") != "none":
        raise ValueError(f"{src} is already quantized ({manifest.quantization['mode']}); start from fp32")
    return manifest, block_size


def _write_graphs(src: Path, encoder_in: Path, decoder_in: Path, staging: Path, mode: str, *,
                  calibration: Path | None, calibration_count: int,
                  exclude_nodes: tuple[str, ...], quantize_encoder: bool, block_size: int | None) -> dict:
    """Write the ``mode`` versions of the export ``src``'s two graphs into ``staging``.

    Returns:
        The manifest's quantization section so far.
    """
    encoder_out, decoder_out = staging / "encoder.onnx", staging / "decoder.onnx"
    info: dict = {"mode": mode}
    if mode == "int8-dynamic":
        # Conv weights are stored int8 + DequantizeLinear (weight-only). Turning off ORT's
        # QDQ handling lets constant folding restore float weights at load, so convolutions
        # keep their prepacked fast path, which the convolutional encoders' speed rests on.
        info["session_config"] = {"session.disable_quant_qdq": "1"}
        _dynamic(encoder_in, encoder_out, exclude_nodes, quantize_encoder)
        _dynamic(decoder_in, decoder_out, exclude_nodes, True)
    elif mode in BLOCK_MODES:
        info["session_config"] = {"session.disable_quant_qdq": "1"}
        info["block_size"] = block_size
        # The encoder is int8-dynamic's: a vision encoder's many rows per image run faster in
        # its integer matmul than in the block kernel.
        _dynamic(encoder_in, encoder_out, exclude_nodes, quantize_encoder)
        _nbits(decoder_in, decoder_out, exclude_nodes, block_size, BLOCK_MODES[mode])
    elif mode == "int8-static":
        from .calibration import calibration_readers

        images = calibration_images(calibration, calibration_count)
        info["calibration"] = {"images": [p.name for p in images], "method": "minmax",
                               "folder": str(calibration)}
        encoder_reader, decoder_reader = calibration_readers(src, images)
        _static(encoder_in, encoder_out, encoder_reader, exclude_nodes, quantize_encoder)
        # Per-tensor scales for the decoder: ORT runs per-tensor QLinearMatMul natively, while
        # per-channel weights fall back to dequantize-then-float matmul every step.
        _static(decoder_in, decoder_out, decoder_reader, exclude_nodes, True, per_channel=False)
    elif mode == "fp16":
        _fp16(encoder_in, encoder_out)
        _fp16(decoder_in, decoder_out)
    else:
        shutil.copyfile(encoder_in, encoder_out)
        shutil.copyfile(decoder_in, decoder_out)
    return info


def _batch_invariant(staging: Path, mode: str, calibration: Path | None, count: int,
                     calibrate_encoder: bool = False) -> Manifest:
    """No activation scale may span two rows of a batch (see batch_invariant.py): the encoder
    per row or calibrated; int8-dynamic's decoder calibrated when a calibration folder is given
    (as fast as the dynamic kernel), otherwise per row; block decoders quantize per row in their
    kernel already."""
    from .batch_invariant import make_batch_invariant

    wants_images = mode == "int8-dynamic" or calibrate_encoder
    images = calibration_images(calibration, count) if wants_images and calibration else None
    make_batch_invariant(staging, images, calibrate_encoder)
    return Manifest.read(staging)


def default_block_size(mode: str, width: int) -> int:
    """The largest supported block that divides the decoder width, up to the mode's
    ``BIT_EXACT_BLOCK`` so that a caption never depends on its batch; the mode's limit (and so
    an error) when none divides it."""
    limit = BIT_EXACT_BLOCK[mode]
    fitting = [b for b in BLOCK_SIZES if width % b == 0 and b <= limit]
    return max(fitting) if fitting else limit


def check_block_size(mode: str, block_size: int, width: int) -> None:
    """Raises ValueError for a block size the kernel lacks or one that does not divide the width."""
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"{mode} block size {block_size} unsupported; choose from {BLOCK_SIZES}")
    if width % block_size:
        # Padded blocks would waste space and the tied embedding could not share the head's rows.
        # The hint stays within the mode's bit-exact blocks: a caption never depends on its batch.
        fitting = default_block_size(mode, width) if width % min(BLOCK_SIZES) == 0 else None
        hint = f"; use --block-size {fitting}" if fitting else ""
        raise ValueError(f"{mode} block size {block_size} does not divide the decoder width {width}{hint}")


def _size(path: Path) -> int:
    return path.stat().st_size


def _excluded(model_path: Path, prefixes: tuple[str, ...]) -> list[str]:
    """Node names to keep in float: name prefixes, or "lm_head" for the output projection
    (the MatMul on the vocabulary-sized embedding, whose node name the exporter invents)."""
    if not prefixes:
        return []
    graph = onnx.load(str(model_path)).graph
    names = [n.name for n in graph.node if any(n.name.startswith(p) for p in prefixes)]
    if "lm_head" in prefixes:
        names += [n.name for n in graph.node if n.op_type == "MatMul" and "output_embedding" in n.input]
    return names


def _dynamic(src: Path, dst: Path, exclude: tuple[str, ...], enabled: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not enabled:
        shutil.copyfile(src, dst)
        return
    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False,
        op_types_to_quantize=["MatMul"], nodes_to_exclude=_excluded(src, exclude),
        # DefaultTensorType: shape inference cannot type the outputs of com.microsoft fused ops
        # (MultiHeadAttention, SkipLayerNormalization) in the fused decoder; they are all float.
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    share_quantized_embedding(dst)
    int8_conv_weights(dst)


def _nbits(src: Path, dst: Path, exclude: tuple[str, ...], block_size: int, bits: int,
           enabled: bool = True) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if not enabled:
        shutil.copyfile(src, dst)
        return
    model = onnx.load(str(src))
    # accuracy_level 4: the kernel quantizes activations to int8 (per row and block) and uses
    # integer dot products (AVX-VNNI / AVX512-VNNI / ARM dot), the fast path on CPUs; weights
    # stay 4- or 8-bit in memory.
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=4, nodes_to_exclude=_excluded(src, exclude))
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer.process()
    model = quantizer.model.model
    share_nbits_embedding(model, block_size, bits)
    store_conv_weights_int8(model)  # as int8-dynamic stores them (the decoder has none)
    onnx.save(model, str(dst))


def share_nbits_embedding(model: onnx.ModelProto, block_size: int, bits: int = 4) -> None:
    """Gather the tied token embedding from the LM head's 4- or 8-bit matrix; drop the fp32 copy.

    MatMulNBits stores the head as [vocab, blocks, block_size * bits / 8] bytes: one vocabulary
    row per token, which is exactly an embedding table quantized along its width. The fused step
    looks tokens up as Gather(output_embedding [width, vocab], ids, axis=1) -> Transpose, so that
    pair becomes GatherBlockQuantized(rows of the packed matrix) -> Reshape [rows, 1, width].
    Other graph shapes keep the fp32 table (correct, just larger).
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    packed, scales = inits.get(f"output_embedding_Q{bits}"), inits.get("output_embedding_scales")
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == "output_embedding"]
    if packed is None or scales is None or len(gathers) != 1:
        return
    gather = gathers[0]
    consumers = [n for n in graph.node if gather.output[0] in n.input]
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    perm = next((list(a.ints) for a in consumers[0].attribute if a.name == "perm"), None) if consumers else None
    if axis != 1 or len(consumers) != 1 or consumers[0].op_type != "Transpose" or perm != [1, 2, 0]:
        log.warning("%d-bit: embedding lookup has an unexpected shape; keeping its fp32 table", bits)
        return
    transpose = consumers[0]
    vocab, blocks = packed.dims[0], packed.dims[1]
    width = blocks * block_size
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and packed.name in n.input)
    if next(a.i for a in head.attribute if a.name == "K") != width:
        log.warning("%d-bit: width is not a multiple of block %d; keeping the fp32 embedding", bits,
                    block_size)
        return
    gather_scales = numpy_helper.to_array(scales).reshape(vocab, blocks, 1)
    graph.initializer.extend([
        numpy_helper.from_array(gather_scales, "output_embedding_gather_scales"),
        numpy_helper.from_array(np.array([-1, 1, width], np.int64), "output_embedding_row_shape"),
    ])
    picked = f"{gather.name}_int{bits}"
    new_nodes = [
        helper.make_node("GatherBlockQuantized", [packed.name, gather.input[1], "output_embedding_gather_scales"],
                         [picked], name=picked, domain="com.microsoft", bits=bits, block_size=block_size,
                         gather_axis=0, quantize_axis=2),
        helper.make_node("Reshape", [picked, "output_embedding_row_shape"], [transpose.output[0]],
                         name=f"{gather.name}_rows"),
    ]
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    graph.node.remove(transpose)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(position + offset, node)
    if not any("output_embedding" in n.input for n in graph.node):
        graph.initializer.remove(inits["output_embedding"])
        log.info("embedding now gathered from the LM head's %d-bit matrix", bits)


def _static(src: Path, dst: Path, reader, exclude: tuple[str, ...], enabled: bool,
            per_channel: bool = True) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not enabled:
        shutil.copyfile(src, dst)
        return
    quantize_static(
        str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
        op_types_to_quantize=["MatMul", "Conv"], nodes_to_exclude=_excluded(src, exclude),
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True},
    )


def _fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # keep_io_types: graph inputs/outputs stay float32, so the runtime feeds the same arrays.
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    onnx.save(converted, str(dst))


def int8_conv_weights(path: Path) -> None:
    """``store_conv_weights_int8`` on the graph file at ``path``, in place."""
    model = onnx.load(str(path))
    store_conv_weights_int8(model)
    onnx.save(model, str(path))


def store_conv_weights_int8(model: onnx.ModelProto) -> None:
    """Store convolution weights as int8 (per output channel, symmetric) + DequantizeLinear.

    Weight-only: the convolution still runs in float. ORT's integer convolution (ConvInteger) is
    several times slower than its float one on CPU, but the 4x smaller file is worth keeping.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for conv in [n for n in graph.node if n.op_type == "Conv" and n.input[1] in inits]:
        name = conv.input[1]
        if name.endswith("_dequantized"):
            continue
        weight = numpy_helper.to_array(inits[name]).astype(np.float32)
        peak = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        shape = (-1,) + (1,) * (weight.ndim - 1)
        quantized = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
        graph.initializer.remove(inits[name])
        graph.initializer.extend([
            numpy_helper.from_array(quantized, f"{name}_int8"),
            numpy_helper.from_array(scale, f"{name}_int8_scale"),
            numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{name}_int8_zero"),
        ])
        graph.node.insert(list(graph.node).index(conv), helper.make_node(
            "DequantizeLinear", [f"{name}_int8", f"{name}_int8_scale", f"{name}_int8_zero"],
            [f"{name}_dequantized"], axis=0, name=f"{name}_dequantize"))
        conv.input[1] = f"{name}_dequantized"


def share_quantized_embedding(path: Path) -> None:
    """Point the embedding Gather at the LM head's int8 matrix and drop the fp32 copy.

    After dynamic quantization the head reads ``W_quantized`` (int8 [width, vocab]) with one
    scale and zero point; the lookup still gathers columns of fp32 ``W``. Rewire the lookup to
    Gather(int8, axis=1) -> Cast -> (x - zero_point) * scale, so ``W`` can go.
    """
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for gather in [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits]:
        name = gather.input[0]
        quantized = inits.get(f"{name}_quantized")
        scale, zero = inits.get(f"{name}_scale"), inits.get(f"{name}_zero_point")
        if quantized is None or scale is None or zero is None:
            continue
        if numpy_helper.to_array(scale).size != 1:
            continue  # per-channel scales would need their own gather; keep the fp32 copy
        axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
        base = gather.name or name
        picked, as_float, centered = f"{base}_q", f"{base}_qf", f"{base}_qc"
        zero_float = f"{name}_zero_point_float"
        graph.initializer.append(numpy_helper.from_array(
            numpy_helper.to_array(zero).astype(np.float32).reshape(()), zero_float))
        new_nodes = [
            helper.make_node("Gather", [quantized.name, gather.input[1]], [picked], axis=axis,
                             name=f"{base}_gather_int8"),
            helper.make_node("Cast", [picked], [as_float], to=onnx.TensorProto.FLOAT,
                             name=f"{base}_cast"),
            helper.make_node("Sub", [as_float, zero_float], [centered], name=f"{base}_center"),
            helper.make_node("Mul", [centered, scale.name], [gather.output[0]], name=f"{base}_scale"),
        ]
        position = list(graph.node).index(gather)
        graph.node.remove(gather)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(position + offset, node)
        if not any(name in n.input for n in graph.node):
            graph.initializer.remove(inits[name])
            log.info("embedding %s now gathered from its int8 copy", name)
    onnx.save(model, str(path))
