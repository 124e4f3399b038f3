"""Batch-invariant int8 activations: an image's caption never depends on the rest of its batch.

ONNX Runtime's dynamic quantization (``DynamicQuantizeLinear``, fused at load into
``DynamicQuantizeMatMul``) picks one activation scale and zero point per tensor, so every row of a
batch shares them: one image's pixels, or another hypothesis's token, move the rounding of all the
others, and a caption can change with the traffic it was batched with. This module rewrites the
graphs of an int8-dynamic export so that no quantization parameter spans two rows:

* per row (no data needed): each row of the last axis (one token of one image in the encoder; one
  hypothesis in a decoder step) gets its own symmetric scale. ``x / max|x|`` is quantized with the
  fixed scale 1/127 and zero point 128, the integer product runs in ``MatMulIntegerToFloat`` and is
  scaled back by ``max|x|``. Five small nodes per quantized activation: negligible next to the
  encoder's large matmuls, but a one-row decoder step pays their overhead on every token.
* calibrated (decoder): one fixed scale and zero point per activation tensor, from the range seen
  while captioning calibration images (greedy and beam). ``QuantizeLinear`` +
  ``MatMulIntegerToFloat`` are as fast as the dynamic kernel; values outside the range saturate.

Weights are untouched, so an existing int8-dynamic export converts in place:
``python -m edgecap.export.quantize.batch_invariant MODEL_DIR --calibration IMAGES_DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecap.manifest import Manifest

log = logging.getLogger("edgecap.export")
# ONNX Runtime's block kernels handle rows in pairs; with long blocks a leftover odd row takes a
# one-row path that sums in another order, so a row's result would depend on its batch. Up to
# these block sizes both paths agree bit for bit (tests/test_quantize.py checks it on this CPU).
BIT_EXACT_BLOCK = {"int8-block": 64, "int4": 32}

CALIBRATION_BEAMS = (1, 3)  # greedy and beam steps both shape the decoder's activation ranges
ROW_EPSILON = 1e-30  # an all-zero row quantizes to zeros instead of dividing by zero


@dataclasses.dataclass
class DynamicMatMul:
    """One ``quantize_dynamic`` matmul: MatMulInteger -> Cast -> Mul(a_scale * w_scale)."""

    matmul: onnx.NodeProto
    scales_mul: onnx.NodeProto  # Mul(activation scale, weight scale)
    cast: onnx.NodeProto
    output_mul: onnx.NodeProto
    activation_scale: str  # the DynamicQuantizeLinear's scale output

    @property
    def weight_scale(self) -> str:
        return next(i for i in self.scales_mul.input if i != self.activation_scale)


def dynamic_groups(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, list[DynamicMatMul]]]:
    """Every DynamicQuantizeLinear with the matmuls that read its output.

    Raises:
        ValueError: a quantized activation feeds something other than the quantize_dynamic
            pattern (it would stay shared across the batch).
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    groups = []
    for dql in [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]:
        matmuls = []
        for mm in consumers.get(dql.output[0], []):
            cast = _only(consumers.get(mm.output[0], []), "Cast")
            output_mul = _only(consumers.get(cast.output[0], []) if cast else [], "Mul")
            scales_mul = next(
                (
                    n
                    for n in consumers.get(dql.output[1], [])
                    if n.op_type == "Mul"
                    and output_mul is not None
                    and n.output[0] in output_mul.input
                ),
                None,
            )
            if mm.op_type != "MatMulInteger" or output_mul is None or scales_mul is None:
                raise ValueError(
                    f"{dql.name}: quantized activation read by {mm.op_type} {mm.name!r} "
                    "outside the MatMulInteger -> Cast -> Mul pattern"
                )
            matmuls.append(DynamicMatMul(mm, scales_mul, cast, output_mul, dql.output[1]))
        groups.append((dql, matmuls))
    return groups


def _only(nodes: list[onnx.NodeProto], op_type: str) -> onnx.NodeProto | None:
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None


def _replace(graph: onnx.GraphProto, old: list[onnx.NodeProto], new: list[onnx.NodeProto]) -> None:
    """Put ``new`` where the first of ``old`` was (its inputs exist there); drop ``old``."""
    position = min(list(graph.node).index(n) for n in old)
    for node in old:
        graph.node.remove(node)
    for offset, node in enumerate(new):
        graph.node.insert(position + offset, node)


def _matmul_to_float(
    m: DynamicMatMul, quantized: str, a_scale: str, a_zero: str, output: str
) -> onnx.NodeProto:
    """The fused integer matmul ORT would build itself, with our activation scale/zero point."""
    w_zero = m.matmul.input[3] if len(m.matmul.input) > 3 else ""
    return helper.make_node(
        "MatMulIntegerToFloat",
        [quantized, m.matmul.input[1], a_scale, m.weight_scale, a_zero, w_zero],
        [output],
        domain="com.microsoft",
        name=f"{m.matmul.name}_to_float",
    )


def per_row_activations(model: onnx.ModelProto) -> int:
    """Quantize every dynamic activation per row of its last axis (symmetric); returns groups."""
    graph = model.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(1 / 127, np.float32), "row_quant_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "row_quant_zero"),
            numpy_helper.from_array(np.array(ROW_EPSILON, np.float32), "row_quant_epsilon"),
        ]
    )
    groups = dynamic_groups(graph)
    for dql, matmuls in groups:
        x, base = dql.input[0], dql.name
        peak, unit, quantized = f"{base}_row_peak", f"{base}_row_unit", f"{base}_row_q"
        nodes = [
            helper.make_node("Abs", [x], [f"{base}_row_abs"], name=f"{base}_row_abs"),
            helper.make_node(
                "ReduceMax",
                [f"{base}_row_abs"],
                [f"{base}_row_max"],
                axes=[-1],
                keepdims=1,
                name=f"{base}_row_max",
            ),
            helper.make_node("Max", [f"{base}_row_max", "row_quant_epsilon"], [peak], name=peak),
            helper.make_node("Div", [x, peak], [unit], name=unit),  # every row within [-1, 1]
            helper.make_node(
                "QuantizeLinear",
                [unit, "row_quant_scale", "row_quant_zero"],
                [quantized],
                name=quantized,
            ),
        ]
        _replace(graph, [dql], nodes)
        for m in matmuls:
            output = m.output_mul.output[0]
            fused = _matmul_to_float(
                m, quantized, "row_quant_scale", "row_quant_zero", f"{output}_unit"
            )
            rescale = helper.make_node(
                "Mul", [f"{output}_unit", peak], [output], name=f"{output}_rescale"
            )
            _replace(graph, [m.matmul, m.cast, m.output_mul, m.scales_mul], [fused, rescale])
    return len(groups)


def calibrated_activations(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> int:
    """Give every dynamic activation the fixed scale/zero point of its calibrated range.

    Raises:
        ValueError: an activation has no calibrated range.
    """
    graph = model.graph
    groups = dynamic_groups(graph)
    for dql, matmuls in groups:
        x = dql.input[0]
        if x not in ranges:
            raise ValueError(f"{x}: no calibrated range (calibrate on this graph)")
        low, high = min(ranges[x][0], 0.0), max(ranges[x][1], 0.0)  # zero stays exact
        scale = np.float32((high - low) / 255.0) if high > low else np.float32(1.0)
        zero = np.uint8(np.clip(np.round(-low / scale), 0, 255))
        scale_name, zero_name, quantized = f"{x}_static_scale", f"{x}_static_zero", f"{x}_static_q"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(scale), scale_name),
                numpy_helper.from_array(np.array(zero), zero_name),
            ]
        )
        quantize = helper.make_node(
            "QuantizeLinear", [x, scale_name, zero_name], [quantized], name=f"{dql.name}_static"
        )
        _replace(graph, [dql], [quantize])
        for m in matmuls:
            fused = _matmul_to_float(m, quantized, scale_name, zero_name, m.output_mul.output[0])
            _replace(graph, [m.matmul, m.cast, m.output_mul, m.scales_mul], [fused])
            _absorb_bias(graph, fused)
    dequantize_embedding_lookup(graph)
    return len(groups)


def _absorb_bias(graph: onnx.GraphProto, fused: onnx.NodeProto) -> None:
    """Fold a following Add of a constant bias into the fused matmul's bias input: one kernel
    less per step (ORT fuses it for DynamicQuantizeMatMul, not for a hand-built node)."""
    fused = next(n for n in graph.node if n.name == fused.name)  # the graph holds a copy
    consumers = [n for n in graph.node if fused.output[0] in n.input]
    inits = {i.name: i for i in graph.initializer}
    if (
        len(consumers) != 1
        or consumers[0].op_type != "Add"
        or fused.output[0] in [o.name for o in graph.output]
    ):
        return
    add = consumers[0]
    bias = next((i for i in add.input if i != fused.output[0]), "")
    if bias not in inits or list(inits[bias].dims) != [
        numpy_helper.to_array(inits[fused.input[1]]).shape[1]
    ]:
        return
    fused.input.append(bias)
    fused.output[0] = add.output[0]
    graph.node.remove(add)


def dequantize_embedding_lookup(graph: onnx.GraphProto) -> None:
    """Gather(int8) -> Cast -> Sub(zero point) -> Mul(scale) becomes Gather -> DequantizeLinear:
    the same arithmetic in one kernel instead of three, on every decoder step."""
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for gather in [
        n for n in graph.node if n.op_type == "Gather" and n.input[0].endswith("_quantized")
    ]:
        cast = _only(consumers.get(gather.output[0], []), "Cast")
        sub = _only(consumers.get(cast.output[0], []), "Sub") if cast else None
        mul = _only(consumers.get(sub.output[0], []), "Mul") if sub else None
        zero = gather.input[0].removesuffix("_quantized") + "_zero_point"
        if mul is None or zero not in inits:
            continue
        scale = next(i for i in mul.input if i != sub.output[0])
        dequantize = helper.make_node(
            "DequantizeLinear",
            [gather.output[0], scale, zero],
            [mul.output[0]],
            name=f"{gather.name}_dequantize",
        )
        _replace(graph, [cast, sub, mul], [dequantize])
        if not any(sub.input[1] in n.input for n in graph.node):
            graph.initializer.remove(inits[sub.input[1]])


class _RangeRecorder:
    """Stands in for the decoder session: runs it with the activations as extra outputs and
    keeps each one's min and max."""

    def __init__(self, session, activations: list[str]):
        self.session = session
        self.activations = activations
        self.ranges = {name: (np.inf, -np.inf) for name in activations}

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self.session.run(list(names) + self.activations, feeds)
        for name, value in zip(self.activations, outputs[len(names) :]):
            low, high = self.ranges[name]
            self.ranges[name] = (min(low, float(value.min())), max(high, float(value.max())))
        return outputs[: len(names)]

    def get_inputs(self):
        return self.session.get_inputs()


def _recorder(path: Path, session_config: dict[str, str]) -> _RangeRecorder:
    """A session on the graph at ``path`` that also returns its dynamically quantized inputs."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    activations = [dql.input[0] for dql, _ in dynamic_groups(model.graph)]
    for name in activations:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    for key, value in session_config.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return _RangeRecorder(session, activations)


def activation_ranges(
    export_dir: Path, images: list[Path], graph: str = "decoder"
) -> dict[str, tuple[float, float]]:
    """Min/max of every dynamically quantized activation of ``graph`` ("encoder" or "decoder")
    while the export in ``export_dir`` captions ``images`` (greedy and beam, batches of 8)."""
    from edgecap import Captioner

    captioner = Captioner(export_dir)
    manifest = captioner.manifest
    config = manifest.quantization.get("session_config", {})
    if graph == "encoder":
        recorder = _recorder(export_dir / manifest.encoder_file, config)
        captioner.runner.encoder = recorder
        captioner.caption(images, num_beams=1, batch_size=8, max_new_tokens=1)
    else:
        recorder = _recorder(export_dir / manifest.decoder_file, config)
        captioner.runner.decoder = recorder
        for beams in CALIBRATION_BEAMS:
            captioner.caption(images, num_beams=beams, batch_size=8)
    return recorder.ranges


def make_batch_invariant(
    export_dir: str | Path,
    calibration_images: list[Path] | None = None,
    calibrate_encoder: bool = False,
) -> dict:
    """Rewrite an int8-dynamic (or int4, int8-block) export in place so no caption depends on
    its batch.

    The encoder is quantized per row (or, with ``calibrate_encoder``, with calibrated fixed
    scales); the decoder per row, or with calibrated fixed scales when ``calibration_images``
    are given (as fast as the dynamic kernel at one row). Records what it did under the
    manifest's ``quantization.activations`` and returns that record.
    """
    export_dir = Path(export_dir)
    manifest = Manifest.read(export_dir)
    record = {"encoder": "per-row", "decoder": "per-row"}
    encoder_path = export_dir / manifest.encoder_file
    encoder = onnx.load(str(encoder_path))
    if calibrate_encoder and calibration_images and dynamic_groups(encoder.graph):
        calibrated_activations(
            encoder, activation_ranges(export_dir, calibration_images, "encoder")
        )
        record["encoder"] = "calibrated"
        record["calibration_images"] = [p.name for p in calibration_images]  # reproducible
        onnx.save(encoder, str(encoder_path))
    elif per_row_activations(encoder):
        onnx.save(encoder, str(encoder_path))
    decoder_path = export_dir / manifest.decoder_file
    decoder = onnx.load(str(decoder_path))
    invariant = True
    if not dynamic_groups(decoder.graph):
        # int4 / int8-block: MatMulNBits quantizes activations per row inside the kernel, and
        # gives a row the same bits in any batch only up to the mode's bit-exact block.
        record["decoder"] = "in-kernel"
        invariant = bit_exact_block(manifest.quantization)
    elif calibration_images:
        ranges = activation_ranges(export_dir, calibration_images)  # with the new encoder
        calibrated_activations(decoder, ranges)
        record["decoder"] = "calibrated"
        record["calibration_images"] = [p.name for p in calibration_images]  # reproducible
    else:
        per_row_activations(decoder)
    onnx.save(decoder, str(decoder_path))
    quantization = dict(manifest.quantization, activations=record, batch_invariant=invariant)
    quantization["bytes"] = encoder_path.stat().st_size + decoder_path.stat().st_size
    dataclasses.replace(manifest, quantization=quantization).write(export_dir)
    log.info("batch-invariant activations: %s", record)
    return record


def bit_exact_block(quantization: dict) -> bool:
    """Whether a block mode's block size is one its kernel sums alike for a row in any batch."""
    block = quantization.get("block_size")
    return block is not None and block <= BIT_EXACT_BLOCK.get(quantization.get("mode"), 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Make an int8-dynamic export batch-invariant, in place."
    )
    parser.add_argument("model", type=Path, help="export directory (rewritten in place)")
    parser.add_argument("--calibration", type=Path, help="image folder: calibrated decoder scales")
    parser.add_argument("--calibration-count", type=int, default=200)
    parser.add_argument(
        "--calibrate-encoder",
        action="store_true",
        help="fixed calibrated scales in the encoder too, instead of per row",
    )
    args = parser.parse_args(argv)
    images = None
    if args.calibration is not None:
        from .calibration import calibration_images

        images = calibration_images(args.calibration, args.calibration_count)
    print(json.dumps(make_batch_invariant(args.model, images, args.calibrate_encoder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
