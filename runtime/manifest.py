"""The manifest: a versioned JSON file that says what an export directory holds and how to run it.

Export writes it; the runtime reads nothing else to know shapes, tokens, preprocessing and
generation defaults. Unknown future versions are refused rather than half-understood.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError, OptionsError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "edgecap"
FORMAT_VERSION = 1

# ---------------------------------------------------------------- graph tensor names
# The contract between export's graphs and the runtime: both sides build names only from these.
# Encoder: PIXEL_VALUES -> cross names. Decoder step: INPUT_IDS, past names, cross names ->
# LOGITS, present names. Per-layer tensors come in (key, value) pairs, layer by layer.
PIXEL_VALUES = "pixel_values"
INPUT_IDS = "input_ids"
LOGITS = "logits"
KV_KINDS = ("key", "value")
# Prefix conditioning (ClipCap style): the encoder emits PREFIX_EMBEDS [B, P, width], GPT-2 input
# embeddings that one decoder call per image turns into the prefix's self-attention K/V (the
# prefill); later steps take those K/V per image, like cross K/V, beside each row's own cache.
PREFIX_EMBEDS = "prefix_embeds"
# Grounding (grounding.py): a grounded encoder also emits PRESENCE [B, labels] probabilities
# and its top ImageNet classes, TAG_IDS [B, k] int64 and TAG_SCORES [B, k] probabilities.
PRESENCE = "presence"
TAG_IDS = "tag_ids"
TAG_SCORES = "tag_scores"
GROUNDING_OUTPUTS = (PRESENCE, TAG_IDS, TAG_SCORES)
CROSS_ATTENTION = "cross-attention"
PREFIX = "prefix"
CONDITIONINGS = (CROSS_ATTENTION, PREFIX)


def _per_layer(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in KV_KINDS]


def cross_names(layers: int) -> list[str]:
    """Cross-attention K/V per layer: the encoder's outputs and the decoder's last inputs."""
    return _per_layer("cross", layers)


def prefix_kv_names(layers: int) -> list[str]:
    """A prefilled prefix's self-attention K/V per layer, one per image: the prefix decoder
    step's last inputs."""
    return _per_layer("prefix", layers)


def past_names(layers: int) -> list[str]:
    """The self-attention cache fed to the decoder step, per layer."""
    return _per_layer("past", layers)


def present_names(layers: int) -> list[str]:
    """The grown cache the decoder step returns, per layer (fed back as the next past)."""
    return _per_layer("present", layers)


def decoder_input_names(layers: int) -> list[str]:
    """The decoder step's inputs in graph order."""
    return [INPUT_IDS, *past_names(layers), *cross_names(layers)]


def prefix_decoder_input_names(layers: int) -> list[str]:
    """The prefix decoder step's inputs in graph order: token ids [rows, T], prefix embeddings
    [rows, P, width] (placed before the tokens; P is zero after the prefill), each row's own
    cache, then the prefix K/V [images, heads, C, head_dim] (C is zero during the prefill)."""
    return [INPUT_IDS, PREFIX_EMBEDS, *past_names(layers), *prefix_kv_names(layers)]


def decoder_output_names(layers: int) -> list[str]:
    """The decoder step's outputs in graph order."""
    return [LOGITS, *present_names(layers)]


@dataclass(frozen=True)
class Preprocessing:
    """How pixels are prepared, in the order applied: resize, rescale, normalize (per channel)."""

    height: int
    width: int
    resample: str = "bilinear"  # PIL filter name: nearest, bilinear, bicubic, lanczos, box, hamming
    do_resize: bool = True
    rescale_factor: float = 1.0 / 255.0  # applied when do_rescale
    do_rescale: bool = True
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # applied after rescale when do_normalize
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_normalize: bool = True


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding defaults, named as in ``transformers.GenerationConfig``."""

    num_beams: int = 1
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    style: str | None = None  # one of Manifest.styles; None: the decoder start token
    presence_gate: bool = True  # grounded models: ban words of labels scored absent


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about one export directory."""

    num_layers: int
    num_heads: int
    head_dim: int
    encoder_seq_len: int
    vocab_size: int  # rows of the decoder's logits (may be a pruned vocabulary, see id_map_file)
    max_positions: int  # decoder position table size: start token + new tokens must fit
    decoder_start_token_id: int  # ids in the decoder's own vocabulary
    eos_token_id: int
    pad_token_id: int
    preprocessing: Preprocessing
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    encoder_file: str = "encoder.onnx"
    decoder_file: str = "decoder.onnx"
    tokenizer_file: str = "tokenizer.json"
    id_map_file: str | None = None  # JSON list: decoder id -> tokenizer id, when the vocab is pruned
    opset: int = 17
    # True: the decoder takes one cross K/V per image, shared by its beams (rows grouped by image).
    shared_cross_kv: bool = False
    # How the image reaches the decoder: "cross-attention" (encoder -> cross K/V per layer) or
    # "prefix" (encoder -> prefix_length input embeddings, prefilled into the cache).
    conditioning: str = CROSS_ATTENTION
    prefix_length: int = 0  # embeddings per image, "prefix" conditioning only
    # True: the prefix's K/V are decoder inputs, one per image shared by its beams. Required for
    # "prefix" conditioning (the earlier layout, the prefix inside every row's cache, is refused).
    shared_prefix_kv: bool = False
    # Caption styles a decoder trained with style tokens can write: name -> its start token id.
    # Empty: one style, started by decoder_start_token_id.
    styles: dict[str, int] = field(default_factory=dict)
    # Presence labels, their thresholds, the gated labels and the tag names file (grounding.py);
    # empty: the encoder emits no grounding outputs.
    grounding: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=lambda: {"mode": "none"})
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def encoder_output_names(self) -> list[str]:
        """What the encoder graph returns: cross K/V per layer, or the prefix embeddings."""
        if self.conditioning == PREFIX:
            return [PREFIX_EMBEDS]
        return cross_names(self.num_layers)

    def decoder_input_names(self) -> list[str]:
        """The decoder step graph's inputs for this conditioning, in graph order."""
        if self.conditioning == PREFIX:
            return prefix_decoder_input_names(self.num_layers)
        return decoder_input_names(self.num_layers)

    def companion_files(self) -> list[str]:
        """The files besides the two graphs that the export needs: tokenizer, id map, tag names."""
        files = [self.tokenizer_file, self.id_map_file, self.grounding.get("tag_labels_file")]
        return [name for name in files if name]

    def start_token(self, style: str | None) -> int:
        """The decoder's first token for ``style`` (None: the model's default)."""
        if style is None:
            return self.decoder_start_token_id
        if style not in self.styles:
            known = ", ".join(self.styles) if self.styles else "none: it writes one style"
            raise OptionsError(f"style {style!r} is not one this model was trained on ({known})")
        return self.styles[style]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = MANIFEST_NAME) -> "Manifest":
        if data.get("format") != FORMAT_NAME:
            raise ModelError(f"{source}: not an edgecap manifest (format={data.get('format')!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelError(
                f"{source}: manifest format_version {version!r} is not supported by this edgecap "
                f"(expects {FORMAT_VERSION}); re-export the model with this version of edgecap"
            )
        try:
            values = dict(data)
            values["preprocessing"] = Preprocessing(**_tuples(values["preprocessing"]))
            values["generation"] = GenerationOptions(**values.get("generation", {}))
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(values) - known
            if unknown:
                raise TypeError(f"unknown fields {sorted(unknown)}")
            conditioning = values.get("conditioning", CROSS_ATTENTION)
            if conditioning not in CONDITIONINGS:
                raise TypeError(f"conditioning {conditioning!r} is not one of {CONDITIONINGS}")
            if conditioning == PREFIX and not values.get("shared_prefix_kv", False):
                raise ModelError(
                    f"{source}: this prefix export keeps the prefix in every beam's cache, a "
                    "layout this edgecap no longer runs; re-export it with this version of edgecap"
                )
            return cls(**values)
        except (KeyError, TypeError) as exc:
            raise ModelError(f"{source}: malformed manifest ({exc}); re-export the model") from exc

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ModelError(
                f"{path}: no manifest; point --model at a directory written by `edgecap export`"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: unreadable manifest ({exc}); re-export the model") from exc
        if not isinstance(data, dict):
            raise ModelError(f"{path}: manifest is not a JSON object; re-export the model")
        return cls.from_dict(data, str(path))


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {key: tuple(v) if isinstance(v, list) else v for key, v in values.items()}
