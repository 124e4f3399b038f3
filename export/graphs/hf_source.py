"""A Hugging Face captioner in edgecap's terms: the model, image processor and tokenizer from a
``save_pretrained`` folder or a Hub id, and their preprocessing and generation settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgecap.manifest import GenerationOptions, Preprocessing
from edgecap.preprocess import RESAMPLE

from .tracing import ExportError


def load_pretrained(src: str | Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(model, image processor, tokenizer, provenance) from a folder or a model id."""
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    folder = Path(src)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ExportError(f"{src}: no config.json; expected a save_pretrained() model folder")
        by_id, location = False, str(folder)
        provenance = {"source": folder.resolve().name, "source_type": "folder-name"}
    else:
        by_id, location = True, model_id(str(src))
        provenance = {"source": location, "source_type": "model-id"}
    provenance["source_kind"] = "hf-vision-encoder-decoder"
    # Offline as set now, not only at import (when transformers read it): cache files only.
    offline = hub_offline()
    try:
        model = VisionEncoderDecoderModel.from_pretrained(
            location, attn_implementation="eager", local_files_only=offline)
    except (OSError, ValueError) as exc:
        if not by_id:
            raise ExportError(f"{src}: cannot load the model: {first_line(exc)}") from exc
        where = "in the local Hugging Face cache (offline: HF_HUB_OFFLINE is set)" if offline \
            else "locally or on the Hugging Face Hub"
        raise ExportError(f"{src}: no such folder, and no model with this id {where}: "
                          f"{first_line(exc)}") from exc
    try:
        processor = AutoImageProcessor.from_pretrained(location, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{src}: cannot load the image processor or tokenizer: "
                          f"{first_line(exc)}") from exc
    revision = getattr(model.config, "_commit_hash", None)
    if by_id and revision:
        provenance["revision"] = revision  # the Hub snapshot actually exported
    return model, processor, tokenizer, provenance


def model_id(src: str) -> str:
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


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (the libraries read them at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    on = ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or any(flag.upper() in on for flag in flags)


def first_line(exc: BaseException) -> str:
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


def generation_defaults(generation: Any, max_positions: int) -> GenerationOptions:
    """A manifest's generation defaults from a transformers GenerationConfig (or
    ``GenerationOptions``, or None), with the length cap ``max_positions`` allows."""
    defaults = generation if isinstance(generation, GenerationOptions) \
        else generation_options(generation)
    if defaults.max_new_tokens + 1 > max_positions:
        defaults = GenerationOptions(**{**defaults.__dict__, "max_new_tokens": max_positions - 1})
    return defaults
