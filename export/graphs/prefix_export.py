"""Export a prefix-conditioned captioner (image encoder + mapper + plain GPT-2, ClipCap style).

``export_prefix_captioner`` writes the encoder graph (pixels -> prefix embeddings), the prefix
step graph (prefill, then one token per step) and a manifest with ``conditioning: "prefix"``;
the runtime decodes it like a cross-attention export. Graphs are staged, run in onnxruntime and
compared with the torch modules before they are moved into ``out_dir``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from edgecap.manifest import (
    INPUT_IDS, LOGITS, PIXEL_VALUES, PREFIX, PREFIX_EMBEDS, GenerationOptions, Manifest,
    Preprocessing, past_names, prefix_decoder_input_names, prefix_kv_names, present_names,
)
from torch import nn

from .hf_source import generation_defaults, preprocessing_from_processor
from .onnx_export import eos_token
from .tracing import OPSET, PARITY_TOLERANCE, ExportError, export_traced, sample_pixels
from .prefix_modules import PrefixEncoderGraph, PrefixStepGraph, check_prefix_decoder

log = logging.getLogger("edgecap.export")


def export_prefix_captioner(
    image_encoder: nn.Module,
    mapper: nn.Module,
    gpt2: nn.Module,
    out_dir: str | Path,
    *,
    image_processor: Any,
    tokenizer: Any,
    prefix_length: int,
    quantize: str | None = None,
    generation: Any = None,
    provenance: dict[str, Any] | None = None,
    check_steps: int = 4,
) -> Manifest:
    """Export a ClipCap-style captioner into ``out_dir``.

    Args:
        image_encoder: module mapping pixel_values [B, 3, H, W] to image features (any shape).
        mapper: module mapping those features to prefix embeddings [B, prefix_length, n_embd].
        gpt2: a ``GPT2LMHeadModel`` without cross-attention.
        out_dir: output folder (created).
        image_processor: a Hugging Face image processor, or a ``Preprocessing``.
        tokenizer: a fast Hugging Face tokenizer, or a ``tokenizers`` JSON file's path.
        prefix_length: embeddings the mapper emits per image.
        quantize: a mode of ``edgecap.export.quantize`` applied to the written export, or None.
        generation: a ``transformers.GenerationConfig`` or ``GenerationOptions``; default: the
            model's generation config.
        provenance: recorded in the manifest (keep private paths out of it).
        check_steps: decoder steps after the prefill compared with PyTorch.
    Returns:
        The manifest written into ``out_dir``.
    Raises:
        ExportError: unsupported model, wrong prefix shape, or graphs that disagree with PyTorch.
    """
    for module in (image_encoder, mapper, gpt2):
        module.eval()
    config = gpt2.config
    try:
        check_prefix_decoder(config)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    preprocessing = image_processor if isinstance(image_processor, Preprocessing) \
        else preprocessing_from_processor(image_processor)
    encoder_graph, pixels = _encoder_graph(image_encoder, mapper, preprocessing, prefix_length,
                                           config.n_embd)
    # Positions hold the prefix, then every fed token; the last new token is never fed.
    max_positions = config.n_positions - prefix_length + 1
    options = generation_defaults(
        generation if generation is not None else gpt2.generation_config, max_positions)
    manifest = _manifest(config, prefix_length, max_positions, _eos(config, generation),
                         preprocessing, options, provenance)
    out = Path(out_dir)
    _write(out, manifest, encoder_graph, gpt2, pixels, tokenizer, check_steps)
    if quantize is not None:
        from ..quantize.variants import quantize_export

        quantize_export(out, out, mode=quantize)
    return Manifest.read(out)


def _encoder_graph(image_encoder: nn.Module, mapper: nn.Module, preprocessing: Preprocessing,
                   prefix_length: int, width: int) -> tuple[nn.Module, torch.Tensor]:
    """The encoder graph's module and its sample pixels, once its output has the prefix's
    shape [batch, prefix_length, width]."""
    encoder_graph = PrefixEncoderGraph(image_encoder, mapper).eval()
    pixels = sample_pixels(preprocessing, batch=2)
    with torch.no_grad():
        shape = tuple(encoder_graph(pixels).shape)
    if shape != (2, prefix_length, width):
        raise ExportError(f"mapper output {shape} is not (batch, prefix_length={prefix_length}, "
                          f"n_embd={width})")
    return encoder_graph, pixels


def _manifest(config, prefix_length: int, max_positions: int, eos: int,
              preprocessing: Preprocessing, options: GenerationOptions,
              provenance: dict[str, Any] | None) -> Manifest:
    return Manifest(
        num_layers=config.n_layer, num_heads=config.n_head, head_dim=config.n_embd // config.n_head,
        encoder_seq_len=prefix_length, vocab_size=config.vocab_size, max_positions=max_positions,
        # The start slot is a placeholder (the prefix stands there); EOS keeps it out of any text.
        decoder_start_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        preprocessing=preprocessing, generation=options, opset=OPSET,
        conditioning=PREFIX, prefix_length=prefix_length, shared_prefix_kv=True,
        provenance={**(provenance or {}), "source_kind": "prefix-captioner",
                    "decoder_graph": "traced", "torch": torch.__version__},
    )


def _eos(config, generation) -> int:
    eos = eos_token(config, generation)
    if eos is None:
        raise ExportError("model defines no eos token")
    return int(eos)


def _write(out: Path, manifest: Manifest, encoder_graph: nn.Module, gpt2: nn.Module,
           pixels: torch.Tensor, tokenizer: Any, check_steps: int) -> None:
    """Stage both graphs, check them against torch, then move them into ``out``."""
    parent = out.parent if out.parent.exists() else None
    staging = Path(tempfile.mkdtemp(prefix=".edgecap-export-", dir=parent))
    try:
        export_traced(encoder_graph, (pixels,), staging / manifest.encoder_file, [PIXEL_VALUES],
                [PREFIX_EMBEDS], {PIXEL_VALUES: {0: "batch"}, PREFIX_EMBEDS: {0: "batch"}})
        _export_step(PrefixStepGraph(gpt2).eval(), staging / manifest.decoder_file, manifest)
        parity = check_prefix_parity(staging, manifest, pixels, encoder_graph, gpt2, check_steps)
        log.info("parity vs torch: max |logit diff| %.2e", parity["max_abs_logit_diff"])
        _save_tokenizer(tokenizer, staging / manifest.tokenizer_file)
        manifest.provenance["parity"] = parity
        manifest.write(staging)
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            shutil.move(str(item), out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_tokenizer(tokenizer: Any, path: Path) -> None:
    if isinstance(tokenizer, (str, Path)):
        shutil.copyfile(tokenizer, path)
    elif getattr(tokenizer, "is_fast", False):
        tokenizer.backend_tokenizer.save(str(path))
    else:
        raise ExportError("tokenizer has no fast (tokenizers) version to export")


def _export_step(graph: PrefixStepGraph, path: Path, manifest: Manifest) -> None:
    layers, heads, head_dim = manifest.num_layers, manifest.num_heads, manifest.head_dim
    # Distinct sizes > 1, so the tracer cannot specialise on any of them: two images with two
    # rows each, two tokens after three prefix embeddings, own and prefix caches of 3 and 5.
    images, rows, tokens, prefix, cached, prefixed = 2, 4, 2, 3, 3, 5
    ids = torch.zeros(rows, tokens, dtype=torch.long)
    embeds = torch.randn(rows, prefix, heads * head_dim)
    past = [torch.randn(rows, heads, cached, head_dim) for _ in range(2 * layers)]
    prefix_kv = [torch.randn(images, heads, prefixed, head_dim) for _ in range(2 * layers)]
    axes = {INPUT_IDS: {0: "rows", 1: "tokens"}, PREFIX_EMBEDS: {0: "rows", 1: "prefix"},
            LOGITS: {0: "rows"}}
    axes.update({name: {0: "rows", 2: "past_len"} for name in past_names(layers)})
    axes.update({name: {0: "images", 2: "prefix_len"} for name in prefix_kv_names(layers)})
    axes.update({name: {0: "rows", 2: "total_len"} for name in present_names(layers)})
    export_traced(graph, (ids, embeds, *past, *prefix_kv), path, prefix_decoder_input_names(layers),
            [LOGITS, *present_names(layers)], axes)


PARITY_ROWS_PER_IMAGE = 2  # rows that share an image's prefix K/V in the check, as beams do


def check_prefix_parity(directory: Path, manifest: Manifest, pixels: torch.Tensor,
                        encoder_graph: nn.Module, gpt2: nn.Module, steps: int) -> dict[str, float]:
    """The prefill, then ``steps`` random tokens on two rows per image, in onnxruntime. Every
    step's logits must equal ``gpt2`` run on each row's whole [prefix, tokens] sequence (no
    cache), so the prefix K/V shared by an image's rows, each row's own cache and the positions
    are all checked."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    cpu = ["CPUExecutionProvider"]
    encoder = ort.InferenceSession(str(directory / manifest.encoder_file), options, providers=cpu)
    decoder = ort.InferenceSession(str(directory / manifest.decoder_file), options, providers=cpu)
    (prefix,) = encoder.run([PREFIX_EMBEDS], {PIXEL_VALUES: pixels.numpy()})
    images, width = prefix.shape[0], prefix.shape[2]
    names = prefix_decoder_input_names(manifest.num_layers)

    def empty(rows: int) -> list[np.ndarray]:
        shape = (rows, manifest.num_heads, 0, manifest.head_dim)
        return [np.zeros(shape, np.float32)] * (2 * manifest.num_layers)

    prefill = [np.zeros((images, 0), np.int64), prefix, *empty(images), *empty(images)]
    logits, *prefix_kv = decoder.run(None, dict(zip(names, prefill)))
    with torch.no_grad():
        reference_prefix = encoder_graph(pixels)
    worst = _compare(logits, gpt2, reference_prefix, np.zeros((images, 0), np.int64), 0)
    rows = images * PARITY_ROWS_PER_IMAGE
    reference_prefix = reference_prefix.repeat_interleave(PARITY_ROWS_PER_IMAGE, dim=0)
    past, history = empty(rows), np.zeros((rows, 0), np.int64)
    generator = np.random.default_rng(0)
    for step in range(1, steps + 1):
        ids = generator.integers(0, manifest.vocab_size, size=(rows, 1), dtype=np.int64)
        history = np.concatenate([history, ids], axis=1)
        feeds = [ids, np.zeros((rows, 0, width), np.float32), *past, *prefix_kv]
        logits, *past = decoder.run(None, dict(zip(names, feeds)))
        worst = max(worst, _compare(logits, gpt2, reference_prefix, history, step))
    return {"max_abs_logit_diff": worst, "steps_checked": steps, "rows_checked": rows}


def _compare(logits: np.ndarray, gpt2: nn.Module, prefix: torch.Tensor, history: np.ndarray,
             step: int) -> float:
    """Max |logit difference| against ``gpt2`` on [prefix, history] per row; raises past the
    tolerance."""
    with torch.no_grad():
        tokens = gpt2.transformer.wte(torch.from_numpy(history))
        expected = gpt2(inputs_embeds=torch.cat([prefix, tokens], dim=1)).logits[:, -1, :].numpy()
    diff = float(np.max(np.abs(logits - expected)))
    if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
        raise ExportError(f"exported graphs disagree with PyTorch at step {step}: max |logit "
                          f"diff| {diff:.3g} > {PARITY_TOLERANCE}; nothing was written")
    return diff
