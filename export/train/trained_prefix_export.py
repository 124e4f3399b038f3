"""Export a checkpoint of ``edgecap train --arch prefix`` through ``export_prefix_captioner``.

Training puts the style token right after the image prefix: ``[prefix] [style] caption [end]``.
The runtime feeds no token before a prefix model's first prediction (its start slot is a
placeholder), so the export appends the start token's embedding to the prefix: the encoder
graph emits ``prefix_length + 1`` embeddings, and the decoder sees exactly what it was trained on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from edgecap.manifest import Manifest, Preprocessing
from torch import nn

from ..captioner_model import PrefixEncoder
from ..graphs.onnx_export import ExportError
from ..graphs.prefix_export import export_prefix_captioner


class StartAfterPrefix(nn.Module):
    """prefix [B, P, width] -> [B, P + 1, width]: the start token's input embedding appended."""

    def __init__(self, start_embedding: torch.Tensor):
        super().__init__()
        self.register_buffer("start", start_embedding.detach().clone().reshape(1, 1, -1))

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        return torch.cat([prefix, self.start.expand(prefix.shape[0], -1, -1)], dim=1)


def export_trained_prefix(
    encoder: PrefixEncoder,
    decoder: nn.Module,
    id_map: list[int],
    out_dir: str | Path,
    *,
    preprocessing: Preprocessing,
    tokenizer_file: Path,
    generation: Any,
    provenance: dict[str, Any],
    check_steps: int = 4,
) -> Manifest:
    """Export a trained prefix captioner; decoding starts after ``generation``'s start token.

    Returns:
        The written ``Manifest`` (with the pruned vocabulary's ``id_map.json``).
    Raises:
        ExportError: the graphs disagree with PyTorch, or ``id_map`` does not fit the decoder.
    """
    if len(id_map) != decoder.config.vocab_size:
        raise ExportError(f"id_map has {len(id_map)} entries, decoder vocab is "
                          f"{decoder.config.vocab_size}")
    start = generation.decoder_start_token_id
    with torch.no_grad():
        after_prefix = StartAfterPrefix(decoder.transformer.wte.weight[start])
    export_prefix_captioner(
        encoder, after_prefix, decoder, out_dir, image_processor=preprocessing,
        tokenizer=tokenizer_file, prefix_length=encoder.mapper.prefix_length + 1,
        generation=generation, provenance={**provenance, "start_token_in_prefix": start},
        check_steps=check_steps,
    )
    return attach_id_map(Path(out_dir), id_map)


def attach_id_map(out_dir: Path, id_map: list[int]) -> Manifest:
    """Write the pruned vocabulary's decoder id -> tokenizer id list beside an export and name
    it in the manifest (the runtime decodes text through it)."""
    (out_dir / "id_map.json").write_text(json.dumps([int(i) for i in id_map]))
    manifest = dataclasses.replace(Manifest.read(out_dir), id_map_file="id_map.json")
    manifest.write(out_dir)
    return manifest
