"""``Captioner``: the front door. Loads an export directory and turns images into captions."""

from __future__ import annotations

import dataclasses
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, TypeVar

import numpy as np

from .decoding import Hypothesis, beam_search, greedy_search
from .gpu.device_runner import make_runner
from .errors import EdgecapError, ModelError, OptionsError
from .grounding import Grounding
from .manifest import GROUNDING_OUTPUTS, PIXEL_VALUES, GenerationOptions, Manifest
from .options import DEFAULT_BATCH_SIZE, IO_BINDING, check_generation
from .preprocess import ImageInput, describe, load_image, preprocess_batch
from .results import CaptionFailure, CaptionResult
from .sessions import open_graphs
from .tokenizer import CaptionTokenizer


class Pending(Protocol):
    """A decoded image waiting for its caption, with the options and name it is captioned with
    (the service's queued jobs, the cameras' chosen frames)."""

    image: Any  # RGB PIL image
    options: GenerationOptions
    source: str


P = TypeVar("P", bound=Pending)


def default_model_dir() -> Path:
    """The model shipped inside the package (no download needed)."""
    return Path(str(resources.files("edgecap") / "models" / "default"))


class Captioner:
    """Caption images with an exported encoder + GPT-2 decoder; no PyTorch needed.

    Args:
        model: export directory (from ``edgecap export``); None for the embedded default model.
        device: "cpu" (default), "cuda", "tensorrt" or "auto".
        cpu_threads: intra-op threads; default: the cores this process may use.
        precision: "fp32" (default) or "fp16": TensorRT may run layers in half precision; the
            CUDA provider runs an fp16 export's own precision.
        engine_cache: folder for TensorRT's engines; default: one per model in the user's cache.
        io_binding: "auto" (default: keep the decoder's cache on the GPU between steps), "on"
            (also on the CPU) or "off".
        exact_preprocessing: decode every image at full size before the resize. By default a
            JPEG (or a ``watch`` frame) at least twice the model's input on both sides is
            decoded at a reduced scale that still covers the input (``decode_size``), which
            is much faster and changes pixels slightly; smaller images are exact either way.
    Raises:
        ModelError: missing, corrupt or inconsistent model files (before any image is seen).
        OptionsError: a precision the device cannot honour, or an unknown io_binding.
    """

    def __init__(self, model: str | Path | None = None, *, device: str = "cpu",
                 cpu_threads: int | None = None, precision: str = "fp32",
                 engine_cache: str | Path | None = None, io_binding: str = "auto",
                 exact_preprocessing: bool = False):
        self.model_dir = Path(model) if model is not None else default_model_dir()
        if not self.model_dir.is_dir():
            raise ModelError(f"{self.model_dir}: model directory not found")
        self.manifest = Manifest.read(self.model_dir)
        self.exact_preprocessing = bool(exact_preprocessing)
        m = self.manifest
        self.tokenizer = CaptionTokenizer(
            self.model_dir / m.tokenizer_file, m.vocab_size,
            self.model_dir / m.id_map_file if m.id_map_file else None,
        )
        if io_binding not in IO_BINDING:
            raise OptionsError(f"io_binding must be one of {', '.join(IO_BINDING)} "
                               f"(got {io_binding!r})")
        encoder, decoder = open_graphs(self.model_dir, m, device=device, threads=cpu_threads,
                                       precision=precision, engine_cache=engine_cache)
        _check_graphs(encoder, decoder, m, self.model_dir)
        self.runner = make_runner(encoder, decoder, m, io_binding)
        self.grounding = Grounding.from_manifest(m.grounding, self.model_dir,
                                                 self.tokenizer.to_decoder_ids)

    @property
    def decode_size(self) -> tuple[int, int] | None:
        """(width, height) images may be decoded down towards before the resize (never below);
        None: full size (``exact_preprocessing``, or a model that takes images unresized)."""
        config = self.manifest.preprocessing
        if self.exact_preprocessing or not config.do_resize:
            return None
        return config.width, config.height

    def options(self, **overrides: Any) -> GenerationOptions:
        """The manifest's generation defaults with the given (non-None) overrides.

        Raises:
            OptionsError: an unknown option, a value out of bounds, or a combination this model
                cannot honour (the message names the option).
        """
        options = dataclasses.replace(self.manifest.generation, **check_generation(overrides))
        if options.max_new_tokens + 1 > self.manifest.max_positions:
            raise OptionsError(
                f"max_new_tokens {options.max_new_tokens} exceeds this model's "
                f"{self.manifest.max_positions - 1} positions"
            )
        if options.min_new_tokens > options.max_new_tokens:
            raise OptionsError("min_new_tokens cannot exceed max_new_tokens")
        self.manifest.start_token(options.style)  # an unknown style fails here, before any work
        return options

    def caption(self, images: ImageInput | Iterable[ImageInput], *,
                batch_size: int = DEFAULT_BATCH_SIZE,
                **generation: Any) -> CaptionResult | list[CaptionResult]:
        """Caption one image or a list of them.

        Args:
            images: a path, bytes, PIL image or HxWxC array, or a list of these.
            batch_size: images encoded and decoded together (captions do not depend on it).
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
        results = []
        for outcome in self.caption_stream([images] if single else images,
                                           batch_size=batch_size, **generation):
            if not outcome.ok:
                raise outcome.error
            results.append(outcome)
        return results[0] if single else results

    def caption_stream(self, items: Iterable[ImageInput | tuple[str, ImageInput]], *,
                       batch_size: int = DEFAULT_BATCH_SIZE, **generation: Any
                       ) -> Iterator[CaptionResult | CaptionFailure]:
        """Caption many inputs lazily: one outcome per input, in input order.

        This is the one batching path: inputs are loaded one at a time and captioned in batches
        of ``batch_size`` loaded images; an input that cannot be read becomes a
        ``CaptionFailure`` in its place and never fails the batch around it.

        Args:
            items: inputs as for ``caption``, or ``(source name, input)`` pairs.
            batch_size: images encoded and decoded together.
            **generation: as for ``caption``.
        Yields:
            ``CaptionResult`` (``.ok`` True) or ``CaptionFailure`` (``.ok`` False) per input.
        Raises:
            OptionsError: invalid generation options (before any input is read).
        """
        options = self.options(**generation)
        batch_size = max(1, int(batch_size))
        slots: list[CaptionResult | CaptionFailure | None] = []  # None: waits for its batch
        loaded: list[tuple[str, Any]] = []
        began = time.perf_counter()
        for item in items:
            source, image = item if isinstance(item, tuple) else (describe(item), item)
            try:
                loaded.append((source, load_image(image, reduce_to=self.decode_size)))
                slots.append(None)
            except EdgecapError as exc:
                slots.append(CaptionFailure(source, exc))
            if len(loaded) >= batch_size:
                yield from self._fill(slots, loaded, options, began)
                slots, loaded, began = [], [], time.perf_counter()
        yield from self._fill(slots, loaded, options, began)

    def _fill(self, slots: list, loaded: list[tuple[str, Any]], options: GenerationOptions,
              began: float) -> Iterator[CaptionResult | CaptionFailure]:
        """Caption ``loaded`` and yield every slot in order (failures stay where they were)."""
        outcomes: list[CaptionResult | CaptionFailure] = []
        if loaded:
            sources = [source for source, _ in loaded]
            try:
                outcomes = self.caption_loaded([img for _, img in loaded], options, sources, began)
            except EdgecapError as exc:
                outcomes = [CaptionFailure(source, exc) for source in sources]
        pending = iter(outcomes)
        for slot in slots:
            yield next(pending) if slot is None else slot

    def caption_grouped(self, items: Iterable[P],
                        admit: Callable[[list[P]], list[P]] | None = None
                        ) -> Iterator[tuple[list[P], list[CaptionResult] | Exception]]:
        """Caption decoded images that may carry different options: one ``caption_loaded``
        batch per distinct ``GenerationOptions`` (one decode loop cannot mix beam widths), in
        the order each first appears. Captions do not depend on their batch, so the grouping
        changes no caption.

        Args:
            items: ``Pending`` images (``image``, ``options``, ``source``).
            admit: called with each group just before it is captioned; returns the members
                still wanted (the service drops requests cancelled meanwhile).
        Yields:
            ``(members, results)`` per group, results in member order, or ``(members, error)``
            when captioning the group raised: a failure reaches only its own members.
        """
        groups: dict[GenerationOptions, list[P]] = {}
        for item in items:
            groups.setdefault(item.options, []).append(item)
        for options, members in groups.items():
            members = admit(members) if admit is not None else members
            if not members:
                continue
            try:
                results = self.caption_loaded([m.image for m in members], options,
                                              [m.source for m in members])
            except Exception as exc:  # noqa: BLE001 - the caller hands it to these members
                yield members, exc
                continue
            yield members, results

    def caption_loaded(self, images: list, options: GenerationOptions, sources: list[str],
                       began: float | None = None) -> list[CaptionResult]:
        """Caption already-decoded RGB PIL images (used by batch and streaming front ends)."""
        began = time.perf_counter() if began is None else began
        m = self.manifest
        pixels = preprocess_batch(images, m.preprocessing)
        encoded_at = time.perf_counter()
        gates, tags = None, [[] for _ in images]
        if self.grounding is None:
            cross = self.runner.encode(pixels)
        else:
            cross, (presence, tag_ids, tag_scores) = self.runner.encode_grounded(pixels)
            tags = self.grounding.tags(presence, tag_ids, tag_scores)
            gates = self.grounding.image_bans(presence) if options.presence_gate else None
        decoded_at = time.perf_counter()
        search = beam_search if options.num_beams > 1 else greedy_search
        hypotheses = search(self.runner, cross, options, m.start_token(options.style),
                            m.eos_token_id, gates)
        done = time.perf_counter()
        timings = {
            "preprocess_ms": (encoded_at - began) * 1e3,
            "encoder_ms": (decoded_at - encoded_at) * 1e3,
            "decoder_ms": (done - decoded_at) * 1e3,
            "total_ms": (done - began) * 1e3,
            "batch_size": float(len(images)),
        }
        return [self._result(h, source, timings, image_tags)
                for h, source, image_tags in zip(hypotheses, sources, tags)]

    def _result(self, hypothesis: Hypothesis, source: str, timings: dict[str, float],
                tags: list) -> CaptionResult:
        eos = self.manifest.eos_token_id
        ids = [t for t in hypothesis.token_ids if t != eos]
        token_ids = self.tokenizer.to_tokenizer_ids(ids)
        return CaptionResult(self.tokenizer.decode(token_ids), token_ids, hypothesis.score,
                             source, dict(timings), tags)


def _check_graphs(encoder, decoder, manifest: Manifest, model_dir: Path) -> None:
    """The graphs must have the inputs and outputs the manifest promises."""
    layers = manifest.num_layers
    found = {t.name for t in decoder.get_inputs()}
    if not set(manifest.decoder_input_names()) <= found:
        raise ModelError(
            f"{model_dir}: decoder graph does not match the manifest (expected {layers} layers); "
            "the files come from different exports: re-export the model"
        )
    encoder_outputs = {t.name for t in encoder.get_outputs()}
    encoder_inputs = {t.name for t in encoder.get_inputs()}
    expected_outputs = set(manifest.encoder_output_names())
    if manifest.grounding:
        expected_outputs |= set(GROUNDING_OUTPUTS)
    if not expected_outputs <= encoder_outputs or PIXEL_VALUES not in encoder_inputs:
        raise ModelError(f"{model_dir}: encoder graph does not match the manifest; re-export the model")
    logits_dim = decoder.get_outputs()[0].shape[-1]
    if isinstance(logits_dim, int) and logits_dim != manifest.vocab_size:
        raise ModelError(
            f"{model_dir}: decoder emits {logits_dim} logits but the manifest says vocab "
            f"{manifest.vocab_size}; re-export the model"
        )
