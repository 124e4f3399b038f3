"""Export a checkpoint written by ``edgecap train`` through the same two-graph path."""

from __future__ import annotations

import json
import shlex
from pathlib import Path, PurePath
from typing import Any

from tokenizers import Tokenizer
from transformers import GenerationConfig

from edgecap.manifest import Preprocessing

from ..datasets import STYLE_TOKENS
from ..graphs.onnx_export import ExportError, export_captioner
from .data import STYLE_IDS


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, check_steps: int = 4,
                      fused: bool = True):
    """Export ``checkpoint`` (encoder.pt, decoder/, id_map.json, tokenizer.json, preprocess.json)
    of either model family (encoder.json says which); ``fused`` applies to cross-attention only.

    Returns:
        The written ``Manifest``.
    """
    from ..captioner_model import PrefixEncoder, load_trained

    ckpt = Path(checkpoint)
    for name in ("encoder.pt", "decoder", "id_map.json", "tokenizer.json", "preprocess.json"):
        if not (ckpt / name).exists():
            raise ExportError(f"{ckpt}: not a training checkpoint (missing {name})")
    encoder, decoder, id_map = load_trained(ckpt, with_presence=True)
    pre = json.loads((ckpt / "preprocess.json").read_text())
    height, width = pre["size"]
    preprocessing = Preprocessing(
        height=height, width=width, resample=pre.get("resample", "bilinear"),
        rescale_factor=float(pre.get("rescale_factor", 1.0)), do_rescale=True,
        mean=tuple(pre["mean"]), std=tuple(pre["std"]), do_normalize=True,
    )
    generation = GenerationConfig.from_pretrained(ckpt / "decoder")
    # The checkpoint folder's name only: manifests travel with models, private paths should not.
    provenance = {"source": ckpt.resolve().name, "source_type": "folder-name",
                  "source_kind": "edgecap-train-checkpoint"}
    config_file = ckpt / "train_config.json"
    if config_file.is_file():
        provenance["training"] = public_training_config(json.loads(config_file.read_text()))
    metrics_file = ckpt / "metrics.json"
    if metrics_file.is_file():
        provenance["training_metrics"] = json.loads(metrics_file.read_text())
    if isinstance(encoder, PrefixEncoder):  # an `edgecap train --arch prefix` run
        from .trained_prefix_export import export_trained_prefix

        return export_trained_prefix(
            encoder, decoder, id_map, out_dir, preprocessing=preprocessing,
            tokenizer_file=ckpt / "tokenizer.json", generation=generation,
            provenance=provenance, check_steps=check_steps)
    return export_captioner(
        encoder, decoder, out_dir,
        preprocessing=preprocessing,
        tokenizer_file=ckpt / "tokenizer.json",
        generation=generation,
        decoder_start_token_id=generation.decoder_start_token_id,
        id_map=id_map,
        provenance=provenance,
        check_steps=check_steps,
        fused=fused,
        styles=trained_styles(ckpt / "tokenizer.json", id_map),
    )


def trained_styles(tokenizer_file: Path, id_map: list[int]) -> dict[str, int]:
    """The caption styles a checkpoint's decoder starts with (style name -> decoder id), read
    from its tokenizer's style tokens; empty for checkpoints trained before style tokens."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    styles = {}
    for style, decoder_id in STYLE_IDS.items():
        token_id = tokenizer.token_to_id(STYLE_TOKENS[style])
        if token_id is not None and decoder_id < len(id_map) and id_map[decoder_id] == token_id:
            styles[style] = decoder_id
    return styles


def public_training_config(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded training config with every absolute path cut to its last part (the folder or
    file name), in path fields and in the command line alike; everything else unchanged."""

    def name(path: str) -> str:
        return PurePath(path).name if PurePath(path).is_absolute() or path.startswith("~") else path

    public = dict(config)
    for key, value in config.items():
        if key.endswith("_dir") and isinstance(value, str):
            public[key] = name(value)
        elif key.endswith("_dir") and isinstance(value, list):  # several --data folders
            public[key] = [name(v) if isinstance(v, str) else v for v in value]
    if isinstance(config.get("command_line"), str):
        words = shlex.split(config["command_line"])
        public["command_line"] = shlex.join(name(word) for word in words)
    return public
