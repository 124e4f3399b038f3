"""Execution-provider options for NVIDIA GPUs, derived from the model's manifest.

TensorRT builds one engine per graph for a range of input shapes. Left to itself it sizes that
range from the first inputs it sees and rebuilds the engine whenever a later input falls outside
it, which a decoder does at every step as its cache grows; so every dynamic input gets an
explicit range here (images and beams up to the runtime's caps, cache lengths up to the model's
position table). Engines and TensorRT's timing cache are kept on disk, in a folder per model, so
only the first start pays for the build. The CUDA provider gets settings that keep fp32 results
equal to the CPU's.

Everything here is a pure function of its arguments: the tests check the options without a GPU.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import OptionsError
from ..manifest import INPUT_IDS, PIXEL_VALUES, PREFIX, PREFIX_EMBEDS, Manifest
from ..options import MAX_BATCH, MAX_BEAMS

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Providers per --device, best first; onnxruntime runs each node on the first one that takes it.
WANTED = {
    "cpu": [CPU],
    "cuda": [CUDA, CPU],
    "tensorrt": [TENSORRT, CUDA, CPU],
    "auto": [CUDA, CPU],
}
GRAPHS = ("encoder", "decoder")


@dataclass(frozen=True)
class ShapeRange:
    """One input's shapes for a TensorRT optimization profile: the engine accepts anything from
    ``min`` to ``max`` per axis and picks its kernels for ``opt``."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def _range(*axes: tuple[int, int, int]) -> ShapeRange:
    """A ShapeRange from (min, opt, max) per axis."""
    return ShapeRange(*(tuple(axis[i] for axis in axes) for i in range(3)))


def _fixed(size: int) -> tuple[int, int, int]:
    return (size, size, size)


def encoder_shapes(manifest: Manifest) -> dict[str, ShapeRange]:
    """The encoder's one dynamic input: pixels for one to ``MAX_BATCH`` images."""
    p = manifest.preprocessing
    return {PIXEL_VALUES: _range((1, 1, MAX_BATCH), _fixed(3), _fixed(p.height), _fixed(p.width))}


def decoder_shapes(manifest: Manifest) -> dict[str, ShapeRange]:
    """Every input of the decoder step graph, by name (``Manifest.decoder_input_names``).

    Rows are images x beams: one image with the model's default beams is what a plain call runs
    (the shape TensorRT tunes for), up to ``MAX_BATCH`` images of ``MAX_BEAMS`` beams. A row's
    own cache runs from empty (the first step) to the last position the model has. Per-image
    inputs (shared cross K/V, a prefix's K/V) have one row per image.
    """
    m = manifest
    opt_rows = m.generation.num_beams
    rows, images = (1, opt_rows, MAX_BATCH * MAX_BEAMS), (1, 1, MAX_BATCH)
    heads, head_dim = _fixed(m.num_heads), _fixed(m.head_dim)
    past_len = (0, max(1, m.generation.max_new_tokens // 2), m.max_positions - 1)
    prefix = m.conditioning == PREFIX
    shapes = {}
    for name in m.decoder_input_names():
        kind = _per_layer_kind(name)
        if name == INPUT_IDS:  # one token a step; none during a prefix prefill
            shapes[name] = _range(rows, (0, 1, 1) if prefix else _fixed(1))
        elif name == PREFIX_EMBEDS:  # the whole prefix once per image (prefill), else none
            width = m.num_heads * m.head_dim
            shapes[name] = _range(rows, (0, 0, m.prefix_length), _fixed(width))
        elif kind == "past":
            shapes[name] = _range(rows, heads, past_len, head_dim)
        elif kind == "cross":  # the encoder's sequence, per image or per row
            shared = images if m.shared_cross_kv else rows
            shapes[name] = _range(shared, heads, _fixed(m.encoder_seq_len), head_dim)
        elif kind == "prefix":  # the prefilled prefix, per image; empty during the prefill
            length = (0, m.prefix_length, m.prefix_length)
            shapes[name] = _range(images, heads, length, head_dim)
        else:
            raise ValueError(f"decoder input {name!r} has no shape rule")
    return shapes


def _per_layer_kind(name: str) -> str | None:
    """'past', 'cross' or 'prefix' for per-layer tensors (``<kind>_<key|value>_<layer>``)."""
    parts = name.rsplit("_", 2)
    if len(parts) == 3 and parts[1] in ("key", "value") and parts[2].isdigit():
        return parts[0]
    return None


def profile_options(shapes: dict[str, ShapeRange]) -> dict[str, str]:
    """TensorRT's ``trt_profile_{min,opt,max}_shapes``: ``name:AxBxC,name2:...``."""
    def spell(pick: str) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, getattr(r, pick)))}"
                        for name, r in shapes.items())
    return {f"trt_profile_{pick}_shapes": spell(pick) for pick in ("min", "opt", "max")}


def provider_options(device: str, graph: str, manifest: Manifest, *, precision: str = "fp32",
                     engine_cache: Path | None = None) -> dict[str, dict[str, str]]:
    """Options per provider name for one graph (``graph``: "encoder" or "decoder").

    Args:
        device: cpu, cuda, tensorrt or auto.
        precision: fp32, or fp16 (TensorRT may then run layers in half precision).
        engine_cache: where TensorRT keeps its engines and timing cache (tensorrt only).
    Raises:
        ValueError: an unknown graph, or tensorrt without ``engine_cache``.
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    options: dict[str, dict[str, str]] = {}
    if CUDA in WANTED.get(device, []):
        options[CUDA] = cuda_options(precision)
    if device == "tensorrt":
        if engine_cache is None:
            raise ValueError("tensorrt needs an engine cache folder")
        shapes = encoder_shapes(manifest) if graph == "encoder" else decoder_shapes(manifest)
        options[TENSORRT] = {
            "device_id": "0",
            **profile_options(shapes),
            "trt_engine_cache_enable": "True",
            # fp16 and fp32 engines of one graph must not overwrite each other.
            "trt_engine_cache_path": str(engine_cache / precision),
            "trt_timing_cache_enable": "True",  # kernel timings are reused across graphs
            "trt_timing_cache_path": str(engine_cache),
            "trt_fp16_enable": "True" if precision == "fp16" else "False",
        }
    return options


def cuda_options(precision: str) -> dict[str, str]:
    """The CUDA provider's settings."""
    return {
        "device_id": "0",
        # The patch embedding is the only convolution and runs once per image: an exhaustive
        # cuDNN search would cost more at the first call than it could ever save.
        "cudnn_conv_algo_search": "HEURISTIC",
        # Copies and kernels on one stream: the few host copies (tokens in, logits out) are
        # ordered with the step that needs them, without extra synchronisation.
        "do_copy_in_default_stream": "True",
        # TF32 matrix products round fp32 inputs to ten mantissa bits; off, fp32 tokens equal
        # the CPU's.
        "use_tf32": "0" if precision == "fp32" else "1",
    }


def session_providers(device: str, options: dict[str, dict[str, str]],
                      available: list[str]) -> list[str | tuple[str, dict[str, str]]]:
    """What ``onnxruntime.InferenceSession(providers=...)`` gets: the wanted providers this
    onnxruntime offers, best first, each with its options.

    Raises:
        ValueError: an unknown device.
    """
    wanted = WANTED.get(device)
    if wanted is None:
        raise ValueError(f"unknown device {device!r} (choose auto, cpu, cuda or tensorrt)")
    return [(name, options[name]) if name in options else name
            for name in wanted if name in available]


def check_precision(device: str, precision: str, manifest: Manifest,
                    available: list[str]) -> None:
    """fp16 is a GPU setting: TensorRT converts an fp32 export itself, the CUDA provider runs the
    graph's own precision (an fp16 export), the CPU has no fp16 path.

    Raises:
        OptionsError: fp16 where it would silently do nothing.
    """
    if precision not in ("fp32", "fp16"):
        raise OptionsError(f"precision must be fp32 or fp16 (got {precision!r})")
    if precision == "fp32" or device == "tensorrt":
        return
    on_gpu = device == "cuda" or (device == "auto" and CUDA in available)
    if not on_gpu:
        raise OptionsError("precision fp16 needs a GPU device (--device tensorrt, or cuda with "
                           "an fp16 export); the CPU runs the graphs as exported")
    if manifest.quantization.get("mode") != "fp16":
        raise OptionsError("precision fp16 on cuda needs an fp16 export (edgecap export "
                           "--quantize fp16); tensorrt converts an fp32 export itself")


def default_engine_cache(model_dir: Path, manifest: Manifest) -> Path:
    """A per-user folder for this model's TensorRT engines, named by a hash of its manifest and
    graph files, so two models (or two versions of one) never share an engine."""
    digest = hashlib.sha256()
    for name in ("manifest.json", manifest.encoder_file, manifest.decoder_file):
        path = Path(model_dir) / name
        digest.update(name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "edgecap" / "tensorrt" / digest.hexdigest()[:16]
