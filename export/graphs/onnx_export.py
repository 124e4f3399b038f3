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
import os
import shutil
import tempfile
import warnings
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
from edgecap.preprocess import RESAMPLE

from .fused_step import FUSED_GRAPH_REVISION, UnsupportedForFusion, build_fused_step, check_fusable
from .modules import DecoderStepGraph, EncoderGraph, HFVisionEncoder, input_output_names

log = logging.getLogger("edgecap.export")

OPSET = 17
# fp32 graphs vs torch: kernels differ in summation order only, so anything above this is a bug.
PARITY_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """The export could not be produced, or its graphs disagree with PyTorch."""


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
    model, processor, tokenizer, provenance = _load_pretrained(src)
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


def _load_pretrained(src: str | Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(model, image processor, tokenizer, provenance) from a folder or a model id."""
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    folder = Path(src)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ExportError(f"{src}: no config.json; expected a save_pretrained() model folder")
        by_id, location = False, str(folder)
        provenance = {"source": folder.resolve().name, "source_type": "folder-name"}
    else:
        by_id, location = True, _model_id(str(src))
        provenance = {"source": location, "source_type": "model-id"}
    provenance["source_kind"] = "hf-vision-encoder-decoder"
    # Offline as set now, not only at import (when transformers read it): cache files only.
    offline = _hub_offline()
    try:
        model = VisionEncoderDecoderModel.from_pretrained(
            location, attn_implementation="eager", local_files_only=offline)
    except (OSError, ValueError) as exc:
        if not by_id:
            raise ExportError(f"{src}: cannot load the model: {_first_line(exc)}") from exc
        where = "in the local Hugging Face cache (offline: HF_HUB_OFFLINE is set)" if offline \
            else "locally or on the Hugging Face Hub"
        raise ExportError(f"{src}: no such folder, and no model with this id {where}: "
                          f"{_first_line(exc)}") from exc
    try:
        processor = AutoImageProcessor.from_pretrained(location, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{src}: cannot load the image processor or tokenizer: "
                          f"{_first_line(exc)}") from exc
    revision = getattr(model.config, "_commit_hash", None)
    if by_id and revision:
        provenance["revision"] = revision  # the Hub snapshot actually exported
    return model, processor, tokenizer, provenance


def _model_id(src: str) -> str:
    """``src`` if it is spelled like a Hub model id; otherwise it was meant as a folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(src).exists():
        raise ExportError(f"{src}: not a folder; expected a save_pretrained() folder or a model id")
    try:
        validate_repo_id(src)
    except HFValidationError:
        message = f"{src}: no such folder (nor a Hugging Face model id: name or org/name)"
        raise ExportError(message) from None
    return src


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (the libraries read them at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    on = ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or any(flag.upper() in on for flag in flags)


def _first_line(exc: BaseException) -> str:
    """Library errors span several lines; the CLI prints one, and the first says what failed."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def preprocessing_from_processor(processor: Any) -> Preprocessing:
    """Read resize / rescale / normalize from a Hugging Face image processor."""
    size = processor.size
    if not (isinstance(size, dict) and "height" in size and "width" in size):
        raise ExportError(f"image processor size {size!r} unsupported (need height and width)")
    if getattr(processor, "do_center_crop", False):
        raise ExportError("image processors that center-crop are not supported yet")
    # The runtime's own name -> PIL filter table, read backwards: one list of supported filters.
    names = {int(resample): name for name, resample in RESAMPLE.items()}
    if int(processor.resample) not in names:
        raise ExportError(f"image processor resample {processor.resample!r}: not a PIL filter "
                          f"edgecap supports ({', '.join(RESAMPLE)})")
    mean, std = processor.image_mean, processor.image_std
    return Preprocessing(
        height=int(size["height"]),
        width=int(size["width"]),
        resample=names[int(processor.resample)],
        do_resize=bool(processor.do_resize),
        rescale_factor=float(processor.rescale_factor),
        do_rescale=bool(processor.do_rescale),
        mean=tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)),
        std=tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3)),
        do_normalize=bool(processor.do_normalize),
    )


def generation_options(config: Any) -> GenerationOptions:
    """Map a transformers GenerationConfig (or None) to the manifest's generation defaults."""
    if config is None:
        return GenerationOptions()
    max_new = config.max_new_tokens
    if max_new is None:
        max_new = max(1, int(config.max_length) - 1)  # max_length counts the decoder start token
    min_new = config.min_new_tokens or max(0, int(config.min_length or 0) - 1)
    return GenerationOptions(
        num_beams=int(config.num_beams or 1),
        max_new_tokens=int(max_new),
        min_new_tokens=int(min_new),
        length_penalty=float(config.length_penalty),
        early_stopping=config.early_stopping,
        no_repeat_ngram_size=int(config.no_repeat_ngram_size or 0),
        repetition_penalty=float(config.repetition_penalty or 1.0),
    )


def export_captioner(
    encode: nn.Module,
    lm_model: nn.Module,
    out_dir: str | Path,
    *,
    preprocessing: Preprocessing,
    tokenizer_file: str | Path,
    generation: Any = None,
    decoder_start_token_id: int | None = None,
    id_map: list[int] | None = None,
    reference=None,
    provenance: dict[str, Any] | None = None,
    check_steps: int = 4,
    fused: bool = True,
    styles: dict[str, int] | None = None,
) -> Manifest:
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
    config = lm_model.config
    out = Path(out_dir)
    special = _special_tokens(config, generation, decoder_start_token_id)
    defaults = generation if isinstance(generation, GenerationOptions) else generation_options(generation)
    pixels = _sample_pixels(preprocessing, batch=2)
    with torch.no_grad():
        encoder_seq_len = int(encode(pixels[:1]).shape[1])
    layers, heads = config.n_layer, config.n_head
    if defaults.max_new_tokens + 1 > config.n_positions:
        defaults = GenerationOptions(
            **{**defaults.__dict__, "max_new_tokens": config.n_positions - 1}
        )
    if reference is None:
        reference = _torch_reference(encode, lm_model)

    staging = Path(tempfile.mkdtemp(prefix=".edgecap-export-", dir=out.parent if out.parent.exists() else None))
    try:
        # eval(): the exporter restores each wrapper's mode afterwards, recursively, and a new
        # module starts in training mode (dropout on), which would leak into the parity check.
        encoder_graph = EncoderGraph(encode, lm_model.transformer.h, heads).eval()
        log.info("exporting encoder graph (%d decoder layers' cross K/V)", layers)
        grounding = _export_encoder(encoder_graph, pixels, staging / "encoder.onnx", layers)
        decoder_kind = _write_decoder(lm_model, staging / "decoder.onnx", fused, encoder_seq_len)
        parity = check_parity(staging, pixels, reference, layers, special["decoder_start_token_id"],
                              config.vocab_size, steps=check_steps)
        log.info("parity vs torch: max |logit diff| %.2e", parity["max_abs_logit_diff"])
        shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
        if id_map is not None:
            if len(id_map) != config.vocab_size:
                raise ExportError(f"id_map has {len(id_map)} entries, decoder vocab is {config.vocab_size}")
            (staging / "id_map.json").write_text(json.dumps([int(i) for i in id_map]))
        manifest = Manifest(
            num_layers=layers,
            num_heads=heads,
            head_dim=config.n_embd // heads,
            encoder_seq_len=encoder_seq_len,
            vocab_size=config.vocab_size,
            max_positions=config.n_positions,
            preprocessing=preprocessing,
            generation=defaults,
            id_map_file="id_map.json" if id_map is not None else None,
            opset=OPSET,
            shared_cross_kv=True,
            styles=dict(styles or {}),
            grounding=grounding,
            provenance={**(provenance or {}), "parity": parity, "decoder_graph": decoder_kind,
                        **({"fused_revision": FUSED_GRAPH_REVISION} if decoder_kind == "fused" else {}),
                        "torch": torch.__version__},
            **special,
        )
        manifest.write(staging)
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            shutil.move(str(item), out / item.name)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def _sample_pixels(pre: Preprocessing, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, pre.height, pre.width, generator=generator)


def _export(module: nn.Module, args: tuple, path: Path, inputs, outputs, dynamic_axes) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer chatter
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=outputs,
            dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )


def _export_encoder(graph: EncoderGraph, pixels: torch.Tensor, path: Path, layers: int) -> dict:
    """Write the encoder graph; returns the manifest's grounding section (empty unless the
    encoder has presence heads, whose outputs are then checked and their tag names written)."""
    cross, _, _ = input_output_names(layers)
    outputs = cross + (list(GROUNDING_OUTPUTS) if graph.grounded else [])
    axes = {PIXEL_VALUES: {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    _export(graph, (pixels,), path, [PIXEL_VALUES], outputs, axes)
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
    _export(graph, (ids, *past, *cross), path, inputs, outputs, axes)


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
