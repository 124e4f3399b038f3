"""``Captioner``: the front door. Loads an export directory and turns images into captions."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .decoding import Hypothesis, beam_search, greedy_search
from .errors import ModelError, OptionsError
from .manifest import GenerationOptions, Manifest
from .preprocess import ImageInput, describe, load_image, preprocess_batch
from .sessions import build_session
from .step import GraphRunner
from .tokenizer import CaptionTokenizer


@dataclass
class CaptionResult:
    """One image's caption.

    ``token_ids`` are tokenizer (GPT-2) ids without the end token; ``score`` is the beam's
    length-normalised log-probability (beam search) or the mean token log-probability (greedy);
    ``timings`` are milliseconds for the batch this image was decoded in.
    """

    text: str
    token_ids: list[int]
    score: float
    source: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["generated_text"] = data.pop("text")  # the HF image-to-text pipeline's key
        return data


def default_model_dir() -> Path:
    """The model shipped inside the package (no download needed)."""
    return Path(str(resources.files("edgecap") / "models" / "default"))


class Captioner:
    """Caption images with an exported encoder + GPT-2 decoder; no PyTorch needed.

    Args:
        model: export directory (from ``edgecap export``); None for the embedded default model.
        device: "cpu" (default), "cuda", "tensorrt" or "auto".
        cpu_threads: intra-op threads; default: the cores this process may use.
    Raises:
        ModelError: missing, corrupt or inconsistent model files (before any image is seen).
    """

    def __init__(self, model: str | Path | None = None, *, device: str = "cpu",
                 cpu_threads: int | None = None):
        self.model_dir = Path(model) if model is not None else default_model_dir()
        if not self.model_dir.is_dir():
            raise ModelError(f"{self.model_dir}: model directory not found")
        self.manifest = Manifest.read(self.model_dir)
        m = self.manifest
        self.tokenizer = CaptionTokenizer(
            self.model_dir / m.tokenizer_file, m.vocab_size,
            self.model_dir / m.id_map_file if m.id_map_file else None,
        )
        config = m.quantization.get("session_config", {})
        encoder = build_session(self.model_dir / m.encoder_file, threads=cpu_threads,
                                device=device, config=config, spinning=True)
        decoder = build_session(self.model_dir / m.decoder_file, threads=cpu_threads,
                                device=device, config=config, spinning=True)
        _check_graphs(encoder, decoder, m, self.model_dir)
        self.runner = GraphRunner(encoder, decoder, m)

    def options(self, **overrides: Any) -> GenerationOptions:
        """The manifest's generation defaults with the given (non-None) overrides."""
        values = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(values) - {f.name for f in dataclasses.fields(GenerationOptions)}
        if unknown:
            raise OptionsError(f"unknown generation options: {sorted(unknown)}")
        options = dataclasses.replace(self.manifest.generation, **values)
        if options.num_beams < 1:
            raise OptionsError("num_beams must be >= 1")
        if options.max_new_tokens < 1:
            raise OptionsError("max_new_tokens must be >= 1")
        if options.max_new_tokens + 1 > self.manifest.max_positions:
            raise OptionsError(
                f"max_new_tokens {options.max_new_tokens} exceeds this model's "
                f"{self.manifest.max_positions - 1} positions"
            )
        if options.min_new_tokens > options.max_new_tokens:
            raise OptionsError("min_new_tokens cannot exceed max_new_tokens")
        if options.repetition_penalty <= 0:
            raise OptionsError("repetition_penalty must be > 0")
        return options

    def caption(self, images: ImageInput | Iterable[ImageInput], *, batch_size: int = 8,
                **generation: Any) -> CaptionResult | list[CaptionResult]:
        """Caption one image or a list of them.

        Args:
            images: a path, bytes, PIL image or HxWxC array, or a list of these.
            batch_size: images encoded and decoded together.
            **generation: ``num_beams``, ``max_new_tokens``, ``min_new_tokens``,
                ``length_penalty``, ``early_stopping``, ``no_repeat_ngram_size``,
                ``repetition_penalty`` (transformers' names); the manifest gives the defaults.
        Returns:
            A ``CaptionResult`` for a single image, else a list in input order.
        Raises:
            ImageError: an image cannot be read (the message names it).
            OptionsError: invalid generation options.
        """
        single = isinstance(images, (str, Path, bytes, np.ndarray)) or hasattr(images, "getpixel")
        items = [images] if single else list(images)
        options = self.options(**generation)
        results: list[CaptionResult] = []
        for start in range(0, len(items), max(1, batch_size)):
            chunk = items[start : start + batch_size]
            began = time.perf_counter()
            loaded = [load_image(item) for item in chunk]
            results += self.caption_loaded(loaded, options, [describe(i) for i in chunk], began)
        return results[0] if single else results

    def caption_loaded(self, images: list, options: GenerationOptions, sources: list[str],
                       began: float | None = None) -> list[CaptionResult]:
        """Caption already-decoded RGB PIL images (used by batch and streaming front ends)."""
        began = time.perf_counter() if began is None else began
        m = self.manifest
        pixels = preprocess_batch(images, m.preprocessing)
        encoded_at = time.perf_counter()
        cross = self.runner.encode(pixels)
        decoded_at = time.perf_counter()
        search = beam_search if options.num_beams > 1 else greedy_search
        hypotheses = search(self.runner, cross, options, m.decoder_start_token_id, m.eos_token_id)
        done = time.perf_counter()
        timings = {
            "preprocess_ms": (encoded_at - began) * 1e3,
            "encoder_ms": (decoded_at - encoded_at) * 1e3,
            "decoder_ms": (done - decoded_at) * 1e3,
            "total_ms": (done - began) * 1e3,
            "batch_size": float(len(images)),
        }
        return [self._result(h, source, timings) for h, source in zip(hypotheses, sources)]

    def _result(self, hypothesis: Hypothesis, source: str, timings: dict[str, float]) -> CaptionResult:
        eos = self.manifest.eos_token_id
        ids = [t for t in hypothesis.token_ids if t != eos]
        token_ids = self.tokenizer.to_tokenizer_ids(ids)
        return CaptionResult(self.tokenizer.decode(token_ids), token_ids, hypothesis.score,
                             source, dict(timings))


def _check_graphs(encoder, decoder, manifest: Manifest, model_dir: Path) -> None:
    """The graphs must have the inputs and outputs the manifest promises."""
    layers = manifest.num_layers
    expected_inputs = {"input_ids"} | {f"past_{k}_{i}" for i in range(layers) for k in ("key", "value")}
    found = {t.name for t in decoder.get_inputs()}
    if not expected_inputs <= found:
        raise ModelError(
            f"{model_dir}: decoder graph does not match the manifest (expected {layers} layers); "
            "the files come from different exports: re-export the model"
        )
    encoder_outputs = {t.name for t in encoder.get_outputs()}
    if f"cross_key_{layers - 1}" not in encoder_outputs or "pixel_values" not in {
        t.name for t in encoder.get_inputs()
    }:
        raise ModelError(f"{model_dir}: encoder graph does not match the manifest; re-export the model")
    logits_dim = decoder.get_outputs()[0].shape[-1]
    if isinstance(logits_dim, int) and logits_dim != manifest.vocab_size:
        raise ModelError(
            f"{model_dir}: decoder emits {logits_dim} logits but the manifest says vocab "
            f"{manifest.vocab_size}; re-export the model"
        )
