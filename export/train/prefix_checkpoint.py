"""A checkpoint folder for users' own ClipCap-style captioners, and its export.

``edgecap export-prefix CHECKPOINT_DIR OUT`` reads a folder that a ClipCap fine-tune can produce
with a few lines of Python (docs/export.md shows them)::

    my-clipcap/
      prefix_captioner.json   what the other parts are (SPEC_NAME; keys below)
      gpt2/                   GPT2LMHeadModel.save_pretrained() + its tokenizer's files
      coco_weights.pt         the mapper: ClipCap's MLP or transformer, as a state dict (a whole
                              ClipCap checkpoint will do: "key_prefix" picks clip_project.*)
      clip-vision/            optional: a Hugging Face vision model folder (or name a model id)

Every problem is an ``ExportError`` that names the file, and the key of the JSON when one is at
fault, before any graph is exported.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from edgecap.manifest import Manifest, Preprocessing
from edgecap.preprocess import RESAMPLE
from torch import nn

from ..graphs.clipcap_mappers import ClipCapMLP, ClipCapTransformer, MapperWeightsError
from ..graphs.hf_source import first_line, hub_offline, preprocessing_from_processor
from ..graphs.tracing import ExportError

SPEC_NAME = "prefix_captioner.json"
FORMAT_NAME, FORMAT_VERSION = "edgecap-prefix-checkpoint", 1
HF_OUTPUTS = ("image_embeds", "pooler_output", "last_hidden_state")
EFFICIENTNET_OUTPUTS = ("pooled", "grid")
MAPPER_TYPES = ("mlp", "transformer")  # ClipCap's --mapping_type


@dataclass
class PrefixCheckpoint:
    """A loaded checkpoint folder: the arguments of ``export_prefix_captioner``."""

    image_encoder: nn.Module
    mapper: nn.Module
    gpt2: nn.Module
    preprocessing: Preprocessing
    tokenizer: Any
    prefix_length: int
    provenance: dict[str, Any]


class Spec:
    """The JSON spec, read key by key; every error names the file and the dotted key."""

    def __init__(self, path: Path, data: Any, where: str = ""):
        self.path, self.data, self.where = path, data, where

    def fail(self, key: str, problem: str) -> ExportError:
        return ExportError(f"{self.path}: '{self.where}{key}' {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "is missing")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(key, f"must be {names}, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.fail(key, f"is {value!r}; expected one of {', '.join(choices)}")
        return value

    def section(self, key: str) -> Spec:
        return Spec(self.path, self.get(key, dict), f"{self.where}{key}.")


def read_spec(folder: Path) -> Spec:
    """The folder's ``prefix_captioner.json``, checked for format and version."""
    path = folder / SPEC_NAME
    if not folder.is_dir():
        raise ExportError(f"{folder}: not a folder (expected a prefix checkpoint with {SPEC_NAME})")
    if not path.is_file():
        raise ExportError(f"{path}: not found; a prefix checkpoint folder needs it "
                          "(see docs/export.md)")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: must hold a JSON object")
    spec = Spec(path, data)
    if spec.get("format", str) != FORMAT_NAME:
        raise spec.fail("format", f"must be {FORMAT_NAME!r}")
    if spec.get("format_version", int) != FORMAT_VERSION:
        raise spec.fail("format_version", f"must be {FORMAT_VERSION} for this edgecap")
    return spec


def load_prefix_checkpoint(folder: str | Path) -> PrefixCheckpoint:
    """Load and check every part a checkpoint folder names.

    Raises:
        ExportError: naming the file (and JSON key) at fault.
    """
    folder = Path(folder)
    spec = read_spec(folder)
    prefix_length = spec.get("prefix_length", int)
    if prefix_length < 1:
        raise spec.fail("prefix_length", "must be at least 1")
    gpt2, tokenizer = load_gpt2(folder, spec)
    encoder_spec = spec.section("image_encoder")
    encoder, preprocessing, source = load_image_encoder(folder, encoder_spec)
    if "image_processor" in spec.data:  # overrides the encoder's own (e.g. CLIP's centre crop)
        preprocessing = read_preprocessing(spec.section("image_processor"))
    if preprocessing is None:
        raise spec.fail("image_processor", "is missing, and the image encoder has no "
                        "processor edgecap can follow")
    if spec.get("normalize_features", bool, False):
        encoder = L2Normalized(encoder)
    mapper = load_mapper(folder, spec.section("mapper"), prefix_length, gpt2.config.n_embd)
    check_shapes(spec, encoder, mapper, preprocessing, prefix_length, gpt2.config.n_embd)
    provenance = {"source": folder.resolve().name, "source_type": "folder-name",
                  "source_kind": FORMAT_NAME, "image_encoder": source}
    return PrefixCheckpoint(encoder.eval(), mapper.eval(), gpt2.eval(), preprocessing, tokenizer,
                            prefix_length, provenance)


def export_prefix_checkpoint(folder: str | Path, out_dir: str | Path, *,
                             check_steps: int = 4) -> Manifest:
    """Export a checkpoint folder (see the module doc) with ``export_prefix_captioner``."""
    from ..graphs.prefix_export import export_prefix_captioner

    ckpt = load_prefix_checkpoint(folder)
    return export_prefix_captioner(
        ckpt.image_encoder, ckpt.mapper, ckpt.gpt2, out_dir, image_processor=ckpt.preprocessing,
        tokenizer=ckpt.tokenizer, prefix_length=ckpt.prefix_length, provenance=ckpt.provenance,
        check_steps=check_steps)


# ---------------------------------------------------------------- parts


def load_gpt2(folder: Path, spec: Spec):
    """(GPT2LMHeadModel, fast tokenizer) from the folder ``gpt2`` names."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    path = folder / spec.get("gpt2", str, "gpt2")
    if not (path / "config.json").is_file():
        raise spec.fail("gpt2", f"names {path}, which holds no config.json "
                        "(expected GPT2LMHeadModel.save_pretrained())")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "gpt2":
        raise ExportError(f"{path / 'config.json'}: model_type is {model_type!r}, not 'gpt2'")
    try:
        # Eager attention: the exported graph follows GPT-2's own definition.
        gpt2 = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot load GPT-2 or its tokenizer: {first_line(exc)}") \
            from None
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{path}: no fast tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if gpt2.config.add_cross_attention:
        raise ExportError(f"{path / 'config.json'}: add_cross_attention is true; a prefix "
                          "captioner's GPT-2 has none (export cross-attention models with "
                          "`edgecap export`)")
    return gpt2, tokenizer


def load_image_encoder(folder: Path, spec: Spec):
    """(pixels -> features module, its Preprocessing or None, a public name of its source)."""
    kind = spec.choice("type", ("hf", "efficientnet-lite"))
    if kind == "efficientnet-lite":
        return efficientnet_encoder(spec)
    return hf_encoder(folder, spec)


def efficientnet_encoder(spec: Spec):
    """EfficientNet-Lite with the ImageNet weights of its pip package, as edgecap trains it."""
    from ..captioner_model import build_backbone
    from .config import BACKBONES
    from .data import PREPROCESS

    name = spec.choice("model", BACKBONES)
    pooled = spec.choice("output", EFFICIENTNET_OUTPUTS) == "pooled"
    preprocessing = read_preprocessing(Spec(spec.path, PREPROCESS))
    with contextlib.redirect_stdout(sys.stderr):  # the weights package prints; stdout is JSON
        backbone = build_backbone(True, name)
    return EfficientNetFeatures(backbone, pooled), preprocessing, name


def hf_encoder(folder: Path, spec: Spec):
    """A Hugging Face vision model from a folder in the checkpoint or a model id."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        CLIPVisionModelWithProjection,
    )

    name = spec.get("model", str)
    output = spec.choice("output", HF_OUTPUTS)
    local = folder / name
    location, source = (str(local), local.name) if local.is_dir() else (name, name)
    offline = hub_offline()
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=offline)
        clip = config.model_type in ("clip", "clip_vision_model")
        if output == "image_embeds" and not clip:
            raise spec.fail("output", f"image_embeds needs a CLIP model, {name} is "
                            f"{config.model_type!r}")
        # A full CLIP checkpoint loads its vision half and projection only.
        model_class = CLIPVisionModelWithProjection if clip else AutoModel
        model = model_class.from_pretrained(location, attn_implementation="eager",
                                            local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise spec.fail("model", f"{name}: cannot load it ({first_line(exc)})") from None
    try:
        processor = AutoImageProcessor.from_pretrained(location, local_files_only=offline)
        preprocessing = preprocessing_from_processor(processor)
    except (OSError, ValueError, ExportError):
        preprocessing = None  # the spec must then say how to prepare pixels
    return HFImageFeatures(model, output), preprocessing, source


def read_preprocessing(spec: Spec) -> Preprocessing:
    """``image_processor``: size [height, width], resample, rescale_factor, mean, std."""
    size = spec.get("size", list)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise spec.fail("size", f"must be [height, width] in pixels, got {size!r}")
    triples = {}
    for key in ("mean", "std"):
        value = spec.get(key, list)
        if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
            raise spec.fail(key, f"must list three numbers (R, G, B), got {value!r}")
        triples[key] = tuple(float(v) for v in value)
    return Preprocessing(
        height=size[0], width=size[1], resample=spec.choice("resample", tuple(RESAMPLE), "bicubic"),
        rescale_factor=float(spec.get("rescale_factor", (int, float), 1 / 255)), do_rescale=True,
        mean=triples["mean"], std=triples["std"], do_normalize=True)


def load_mapper(folder: Path, spec: Spec, prefix_length: int, width: int) -> nn.Module:
    """ClipCap's MLP or transformer mapper, its sizes read from the state dict's shapes."""
    kind = spec.choice("type", MAPPER_TYPES)
    path = folder / spec.get("file", str)
    if not path.is_file():
        raise spec.fail("file", f"names {path}, which does not exist")
    key_prefix = spec.get("key_prefix", str, "")
    state = read_state_dict(path, key_prefix)
    if not state:
        raise ExportError(f"{path}: no weights start with '{key_prefix}' (see "
                          f"'{spec.where}key_prefix' in {spec.path.name})")
    try:
        if kind == "mlp":
            activation = spec.choice("activation", ("tanh", "relu"), "tanh")
            return ClipCapMLP.from_state(state, prefix_length, width, activation)
        heads = spec.get("num_heads", int, 8)
        return ClipCapTransformer.from_state(state, prefix_length, width, heads)
    except MapperWeightsError as exc:
        raise ExportError(f"{path}: not ClipCap's {kind} mapper under '{key_prefix}' ({exc}); "
                          f"check '{spec.where}type' and '{spec.where}key_prefix' in "
                          f"{spec.path.name}") from None


def read_state_dict(path: Path, key_prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a torch state dict whose keys start with ``key_prefix``, prefix cut."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise ExportError(f"{path}: not a torch state dict ({first_line(exc)})") from None
    if not isinstance(saved, dict):
        raise ExportError(f"{path}: holds a {type(saved).__name__}, not a state dict")
    return {k[len(key_prefix):]: v for k, v in saved.items()
            if isinstance(k, str) and k.startswith(key_prefix) and isinstance(v, torch.Tensor)}


def check_shapes(spec: Spec, encoder, mapper, preprocessing, prefix_length: int, width: int):
    """Run the parts once on random pixels: a mismatch is named here, not inside an export."""
    pixels = torch.randn(2, 3, preprocessing.height, preprocessing.width)
    with torch.no_grad():
        try:
            features = encoder.eval()(pixels)
        except ExportError as exc:
            raise spec.fail("image_encoder.output", str(exc)) from None
        try:
            prefix = mapper.eval()(features)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise spec.fail("mapper", "does not take the image encoder's features "
                            f"{tuple(features.shape)}: {first_line(exc)}") from None
    if tuple(prefix.shape) != (2, prefix_length, width):
        raise spec.fail("mapper", f"writes {tuple(prefix.shape)} for 2 images, not (2, "
                        f"prefix_length={prefix_length}, GPT-2 width={width})")


# ---------------------------------------------------------------- modules


class HFImageFeatures(nn.Module):
    """One output of a Hugging Face vision model (CLIP's image_embeds are what ClipCap maps)."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = getattr(self.model(pixel_values=pixel_values), self.output)
        if features is None:
            raise ExportError(f"the image encoder gives no {self.output}")
        return features


class EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite's last feature map: the 7x7 grid (B, 49, 1280), or its mean (B, 1280)."""

    def __init__(self, backbone: nn.Module, pooled: bool):
        super().__init__()
        self.backbone, self.pooled = backbone, pooled

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = self.backbone.extract_features(pixel_values).flatten(2).transpose(1, 2)
        return grid.mean(dim=1) if self.pooled else grid


class L2Normalized(nn.Module):
    """Features scaled to unit length (ClipCap's --normalize_prefix)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.encoder(pixel_values)
        return features / features.norm(dim=-1, keepdim=True)
