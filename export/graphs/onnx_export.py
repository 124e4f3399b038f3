"""Export a vision encoder + GPT-2 captioner to edgecap's two ONNX graphs, checked against PyTorch.

Two entry points share one core:
* ``export_pretrained(src, out_dir)``: a Hugging Face ``VisionEncoderDecoderModel``, from a
  ``save_pretrained`` folder (with image-processor and tokenizer files) or by model id;
* ``export_captioner(encode, lm_model, out_dir, ...)``: any torch module returning encoder states
  [B, S, decoder_width] plus a ``GPT2LMHeadModel`` with cross-attention (the default model's path).

Graphs are written to a staging folder, run in onnxruntime and compared with the torch model; only
when they agree are they moved into ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from edgecap.manifest import (
    GROUNDING_OUTPUTS, INPUT_IDS, LOGITS, PIXEL_VALUES, GenerationOptions, Manifest, Preprocessing, past_names,
)

from .fused_step import FUSED_GRAPH_REVISION, UnsupportedForFusion, build_fused_step, check_fusable
from .hf_source import generation_defaults, load_pretrained, preprocessing_from_processor
from .modules import DecoderStepGraph, EncoderGraph, HFVisionEncoder, input_output_names
from .tracing import OPSET, PARITY_TOLERANCE, ExportError, export_traced, sample_pixels

log = logging.getLogger("edgecap.export")


def export_pretrained(src: str | Path, out_dir: str | Path, *, check_steps: int = 4,
                      fused: bool = True) -> Manifest:
    """Export a Hugging Face VisionEncoderDecoderModel into ``out_dir``.

    Args:
        src: a ``save_pretrained()`` folder (with image-processor and tokenizer files), or a
            Hugging Face model id (``name`` or ``org/name``) that ``from_pretrained`` resolves:
            from the local cache, or from the Hub when online. An existing folder wins.
        out_dir: output folder (created).
        check_steps: decoder steps compared with PyTorch before anything is written.
        fused: see ``export_captioner``.
    Returns:
        The manifest written into ``out_dir``. Its provenance names the model id, or the
        folder's name only: manifests travel with models, private paths should not.
    Raises:
        ExportError: ``src`` cannot be loaded, the model is unsupported, or parity fails.
    """
    model, processor, tokenizer, provenance = load_pretrained(src)
    if model.decoder.config.model_type != "gpt2":
        raise ExportError(f"decoder is {model.decoder.config.model_type!r}; only gpt2 is supported")
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{src}: tokenizer has no fast (tokenizers) version to export")

    model.eval()
    encode = HFVisionEncoder(model.encoder, getattr(model, "enc_to_dec_proj", None))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = Path(tmp) / "tokenizer.json"
        tokenizer.backend_tokenizer.save(str(tokenizer_path))

        def reference(pixel_values: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=pixel_values, decoder_input_ids=decoder_ids).logits

        return export_captioner(
            encode,
            model.decoder,
            out_dir,
            preprocessing=preprocessing_from_processor(processor),
            tokenizer_file=tokenizer_path,
            generation=model.generation_config,
            decoder_start_token_id=model.config.decoder_start_token_id,
            reference=reference,
            provenance=provenance,
            check_steps=check_steps,
            fused=fused,
        )


def export_captioner(encode: nn.Module, lm_model: nn.Module, out_dir: str | Path, *,
                     preprocessing: Preprocessing, tokenizer_file: str | Path,
                     generation: Any = None, decoder_start_token_id: int | None = None,
                     id_map: list[int] | None = None, reference=None,
                     provenance: dict[str, Any] | None = None, check_steps: int = 4,
                     fused: bool = True, styles: dict[str, int] | None = None) -> Manifest:
    """Export ``encode`` (pixels -> states) and ``lm_model`` (GPT2LMHeadModel) into ``out_dir``.

    Args:
        encode: module mapping pixel_values [B, 3, H, W] to encoder states [B, S, decoder_width].
        lm_model: a ``GPT2LMHeadModel`` built with ``add_cross_attention=True``.
        preprocessing: how the runtime must prepare pixels for ``encode``.
        tokenizer_file: a ``tokenizers`` JSON file; copied next to the graphs.
        generation: a ``transformers.GenerationConfig`` or ``GenerationOptions``.
        decoder_start_token_id: first decoder token; defaults to the config's bos token.
        id_map: decoder id -> tokenizer id, when the decoder uses a pruned vocabulary.
        reference: optional ``(pixel_values, decoder_ids) -> logits [B, L, V]`` used as the parity
            oracle; defaults to running ``encode`` and ``lm_model`` in torch.
        fused: write the decoder step with ONNX Runtime's fused attention / layer-norm ops
            (``fused_step``) when the decoder allows it; False, or an unsupported decoder, traces
            ``DecoderStepGraph`` instead. Both pass the same parity check.
        styles: caption style name -> start token id, for a decoder trained with style tokens
            (the runtime's ``style`` option picks one).
    Returns:
        The manifest written into ``out_dir``.
    Raises:
        ExportError: unsupported model, or graphs that disagree with PyTorch.
    """
    encode.eval()
    lm_model.eval()
    config, out = lm_model.config, Path(out_dir)
    special = _special_tokens(config, generation, decoder_start_token_id)
    defaults = generation_defaults(generation, config.n_positions)
    pixels = sample_pixels(preprocessing, batch=2)
    if reference is None:
        reference = _torch_reference(encode, lm_model)
    staging = Path(tempfile.mkdtemp(prefix=".edgecap-export-",
                                    dir=out.parent if out.parent.exists() else None))
    try:
        graphs = _write_checked_graphs(staging, encode, lm_model, pixels, reference, fused=fused,
                                       start_id=special["decoder_start_token_id"],
                                       check_steps=check_steps)
        _write_vocabulary(staging, tokenizer_file, id_map, config.vocab_size)
        manifest = graphs.manifest(config, preprocessing=preprocessing, generation=defaults,
                                   id_map=id_map, styles=styles, provenance=provenance,
                                   special=special)
        manifest.write(staging)
        _publish(staging, out)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class _CheckedGraphs:
    """What writing and checking the two graphs found out for the manifest."""

    encoder_seq_len: int
    grounding: dict
    decoder_kind: str  # "fused" or "traced"
    parity: dict[str, float]

    def manifest(self, config, *, preprocessing: Preprocessing, generation: GenerationOptions,
                 id_map: list[int] | None, styles: dict[str, int] | None,
                 provenance: dict[str, Any] | None, special: dict[str, int]) -> Manifest:
        """The manifest of these graphs of the decoder with ``config``."""
        fused = {"fused_revision": FUSED_GRAPH_REVISION} if self.decoder_kind == "fused" else {}
        return Manifest(
            num_layers=config.n_layer, num_heads=config.n_head,
            head_dim=config.n_embd // config.n_head, encoder_seq_len=self.encoder_seq_len,
            vocab_size=config.vocab_size, max_positions=config.n_positions,
            preprocessing=preprocessing, generation=generation,
            id_map_file="id_map.json" if id_map is not None else None, opset=OPSET,
            shared_cross_kv=True, styles=dict(styles or {}), grounding=self.grounding,
            provenance={**(provenance or {}), "parity": self.parity,
                        "decoder_graph": self.decoder_kind, **fused, "torch": torch.__version__},
            **special,
        )


def _write_checked_graphs(staging: Path, encode: nn.Module, lm_model: nn.Module,
                          pixels: torch.Tensor, reference, *, fused: bool, start_id: int,
                          check_steps: int) -> _CheckedGraphs:
    """Write encoder.onnx and decoder.onnx into ``staging`` and check them against torch.

    Raises:
        ExportError: the graphs disagree with PyTorch.
    """
    config = lm_model.config
    with torch.no_grad():
        encoder_seq_len = int(encode(pixels[:1]).shape[1])
    # eval(): the exporter restores each wrapper's mode afterwards, recursively, and a new
    # module starts in training mode (dropout on), which would leak into the parity check.
    encoder_graph = EncoderGraph(encode, lm_model.transformer.h, config.n_head).eval()
    log.info("exporting encoder graph (%d decoder layers' cross K/V)", config.n_layer)
    grounding = _export_encoder(encoder_graph, pixels, staging / "encoder.onnx", config.n_layer)
    decoder_kind = _write_decoder(lm_model, staging / "decoder.onnx", fused, encoder_seq_len)
    parity = check_parity(staging, pixels, reference, config.n_layer, start_id,
                          config.vocab_size, steps=check_steps)
    log.info("parity vs torch: max |logit diff| %.2e", parity["max_abs_logit_diff"])
    return _CheckedGraphs(encoder_seq_len, grounding, decoder_kind, parity)


def _write_vocabulary(staging: Path, tokenizer_file: str | Path, id_map: list[int] | None,
                      vocab_size: int) -> None:
    """The tokenizer, and the decoder -> tokenizer id map of a pruned vocabulary."""
    shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
    if id_map is not None:
        if len(id_map) != vocab_size:
            raise ExportError(f"id_map has {len(id_map)} entries, decoder vocab is {vocab_size}")
        (staging / "id_map.json").write_text(json.dumps([int(i) for i in id_map]))


def _publish(staging: Path, out: Path) -> None:
    """Move the checked files into ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        shutil.move(str(item), out / item.name)


def eos_token(config, generation) -> int | None:
    """The one end token, from the generation config or else the model config (None: none)."""
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    eos = eos if eos is not None else config.eos_token_id
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ExportError(f"several eos tokens {eos} are not supported")
        eos = eos[0]
    return eos


def _special_tokens(config, generation, decoder_start_token_id) -> dict[str, int]:
    eos = eos_token(config, generation)
    start = decoder_start_token_id if decoder_start_token_id is not None else config.bos_token_id
    pad = getattr(generation, "pad_token_id", None) if generation is not None else None
    pad = pad if pad is not None else (config.pad_token_id if config.pad_token_id is not None else eos)
    if start is None or eos is None:
        raise ExportError("model defines no decoder start token or no eos token")
    return {"decoder_start_token_id": int(start), "eos_token_id": int(eos), "pad_token_id": int(pad)}


def _export_encoder(graph: EncoderGraph, pixels: torch.Tensor, path: Path, layers: int) -> dict:
    """Write the encoder graph; returns the manifest's grounding section (empty unless the
    encoder has presence heads, whose outputs are then checked and their tag names written)."""
    cross, _, _ = input_output_names(layers)
    outputs = cross + (list(GROUNDING_OUTPUTS) if graph.grounded else [])
    axes = {PIXEL_VALUES: {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    export_traced(graph, (pixels,), path, [PIXEL_VALUES], outputs, axes)
    if not graph.grounded:
        return {}
    from ..presence_heads import write_grounding

    return write_grounding(graph, path, pixels, path.parent)


def _write_decoder(lm_model: nn.Module, path: Path, fused: bool, encoder_seq_len: int) -> str:
    """Write the decoder step graph; returns which kind was written ("fused" or "traced")."""
    config = lm_model.config
    if fused:
        try:
            check_fusable(config)
        except UnsupportedForFusion as exc:
            log.info("tracing the decoder step instead of fusing it: %s", exc)
        else:
            log.info("writing the fused decoder step graph")
            onnx.save(build_fused_step(lm_model), str(path))
            return "fused"
    log.info("tracing the decoder step graph")
    heads = config.n_head
    _export_decoder(DecoderStepGraph(lm_model).eval(), path, config.n_layer, heads,
                    config.n_embd // heads, encoder_seq_len)
    return "traced"


def _export_decoder(graph, path: Path, layers: int, heads: int, head_dim: int, enc_len: int) -> None:
    _, inputs, outputs = input_output_names(layers)
    rows, past_len = 2, 3  # any sizes > 1, so the tracer cannot specialise on them
    ids = torch.zeros(rows, 1, dtype=torch.long)
    past = [torch.randn(rows, heads, past_len, head_dim) for _ in range(2 * layers)]
    cross = [torch.randn(rows, heads, enc_len, head_dim) for _ in range(2 * layers)]
    axes = {INPUT_IDS: {0: "rows"}, LOGITS: {0: "rows"}}
    cache_inputs = set(past_names(layers))
    for name in inputs[1:]:
        axes[name] = {0: "rows", 2: "past_len"} if name in cache_inputs else {0: "images"}
    for name in outputs[1:]:
        axes[name] = {0: "rows", 2: "total_len"}
    export_traced(graph, (ids, *past, *cross), path, inputs, outputs, axes)


def _torch_reference(encode: nn.Module, lm_model: nn.Module):
    def reference(pixel_values: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        states = encode(pixel_values)
        return lm_model(input_ids=decoder_ids, encoder_hidden_states=states).logits

    return reference


def check_parity(directory: Path, pixels: torch.Tensor, reference, layers: int, start_id: int,
                 vocab_size: int, steps: int) -> dict[str, float]:
    """Run both graphs in onnxruntime for ``steps`` tokens and compare every step's logits with the
    torch model run on the whole prefix (no cache): this checks the cache plumbing too."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    encoder = ort.InferenceSession(str(directory / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(directory / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    cross_names, input_names, _ = input_output_names(layers)
    cross = encoder.run(cross_names, {PIXEL_VALUES: pixels.numpy()})
    rows = pixels.shape[0]
    head_shape = cross[0].shape
    past = [np.zeros((rows, head_shape[1], 0, head_shape[3]), np.float32) for _ in range(2 * layers)]
    generator = np.random.default_rng(0)
    ids = np.full((rows, 1), start_id, dtype=np.int64)
    history = [ids]
    worst = 0.0
    for step in range(steps):
        feeds = dict(zip(input_names, [history[-1], *past, *cross]))
        logits, *past = decoder.run(None, feeds)
        with torch.no_grad():
            expected = reference(pixels, torch.from_numpy(np.concatenate(history, axis=1)))[:, -1, :]
        diff = float(np.max(np.abs(logits - expected.numpy())))
        worst = max(worst, diff)
        if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
            raise ExportError(
                f"exported graphs disagree with PyTorch at step {step}: max |logit diff| {diff:.3g} "
                f"> {PARITY_TOLERANCE}; nothing was written"
            )
        # Random next tokens exercise positions and cache growth with varied inputs.
        history.append(generator.integers(0, vocab_size, size=(rows, 1), dtype=np.int64))
    return {"max_abs_logit_diff": worst, "steps_checked": steps, "rows_checked": rows}
