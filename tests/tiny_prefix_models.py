"""Tiny random-weight prefix captioners (ClipCap style), built in-process (no download).

Each is an image encoder, a mapper to ``prefix_length`` GPT-2 input embeddings, and a plain
GPT2LMHeadModel; the three differ in encoder, mapper, prefix length and decoder shape.
Import it after ``pytest.importorskip("torch")``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tiny_models import gpt2_tokenizer
from torch import nn


@dataclass(frozen=True)
class TinyPrefixConfig:
    name: str
    encoder: str  # "vit-cls": ViT's class token; "conv": a small CNN, pooled; "vit-tokens": all
    mapper: str  # "mlp" (ClipCap's MLP) or "attention" (learned queries over the features)
    prefix_length: int
    image_size: int = 32
    width: int = 32
    layers: int = 2
    heads: int = 2
    tied: bool = True
    scale_by_layer: bool = False
    seed: int = 0
    eos_scale: float = 7.0


PREFIX_CONFIGS = [
    # EOS scales picked so that captions end after varied lengths on the photos (the first one
    # runs to max_new_tokens) and no decision is a near tie (top-two logit gaps well above 1e-3).
    TinyPrefixConfig("conv-mlp-p1", "conv", "mlp", prefix_length=1, eos_scale=4.0),
    TinyPrefixConfig("conv-mlp-p10", "conv", "mlp", prefix_length=10, image_size=40, width=64,
                     layers=1, heads=4, tied=False, seed=1, eos_scale=3.0),
    TinyPrefixConfig("vit-attn-p20", "vit-tokens", "attention", prefix_length=20, image_size=48,
                     width=48, layers=3, heads=4, scale_by_layer=True, seed=2, eos_scale=5.0),
]


def build_prefix_model(cfg: TinyPrefixConfig):
    """(image_encoder, mapper, gpt2, image_processor, tokenizer), all in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, ViTImageProcessor

    torch.manual_seed(cfg.seed)
    encoder, features = _encoder(cfg)
    mapper = _mapper(cfg, features)
    tokenizer = gpt2_tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(n_embd=cfg.width, n_layer=cfg.layers, n_head=cfg.heads, n_positions=64,
                        vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                        tie_word_embeddings=cfg.tied,
                        scale_attn_by_inverse_layer_idx=cfg.scale_by_layer)
    # Eager attention: transformers' SDPA path drops scale_attn_by_inverse_layer_idx, and the
    # exported graph follows GPT-2's definition (as export_pretrained does, loading with eager).
    config._attn_implementation = "eager"
    gpt2 = GPT2LMHeadModel(config)
    # Sharper logits than random init and a likelier EOS (see tiny_models.build_model): decisions
    # are well separated and captions end after varied lengths.
    with torch.no_grad():
        gpt2.transformer.ln_f.weight.mul_(25.0)
        gpt2.lm_head.weight[eos].mul_(cfg.eos_scale)
    gpt2.generation_config.pad_token_id = eos
    processor = ViTImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size},
                                  image_mean=[0.48, 0.45, 0.40], image_std=[0.27, 0.26, 0.28])
    return encoder.eval(), mapper.eval(), gpt2.eval(), processor, tokenizer


def _encoder(cfg: TinyPrefixConfig):
    """(module, feature width)."""
    from transformers import ViTConfig, ViTModel

    if cfg.encoder == "conv":
        return nn.Sequential(nn.Conv2d(3, 16, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten()), 16
    vit = ViTModel(ViTConfig(image_size=cfg.image_size, patch_size=cfg.image_size // 4,
                             hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=48), add_pooling_layer=False)
    return ViTFeatures(vit, cls_only=cfg.encoder == "vit-cls"), 24


def _mapper(cfg: TinyPrefixConfig, features: int):
    if cfg.mapper == "mlp":
        return MLPMapper(features, cfg.width, cfg.prefix_length)
    return QueryMapper(features, cfg.width, cfg.prefix_length)


class ViTFeatures(nn.Module):
    """ViT's last hidden state: every token [B, S, C], or the class token only [B, C]."""

    def __init__(self, vit, cls_only: bool):
        super().__init__()
        self.vit, self.cls_only = vit, cls_only

    def forward(self, pixel_values):
        states = self.vit(pixel_values=pixel_values).last_hidden_state
        return states[:, 0] if self.cls_only else states


class MLPMapper(nn.Module):
    """ClipCap's MLP: features [B, C] -> [B, P * width] -> [B, P, width]."""

    def __init__(self, features: int, width: int, prefix_length: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, width * prefix_length // 2 + width),
                                 nn.Tanh(), nn.Linear(width * prefix_length // 2 + width,
                                                      width * prefix_length))
        self.width, self.prefix_length = width, prefix_length

    def forward(self, features):
        return self.net(features).reshape(features.shape[0], self.prefix_length, self.width)


class QueryMapper(nn.Module):
    """P learned queries attend over the feature tokens [B, S, C]; an MLP follows (a one-layer
    transformer mapper, written out so the tracer sees plain ops)."""

    def __init__(self, features: int, width: int, prefix_length: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(prefix_length, width))
        self.key, self.value = nn.Linear(features, width), nn.Linear(features, width)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))

    def forward(self, features):
        scores = torch.matmul(self.queries, self.key(features).transpose(1, 2))
        attended = torch.matmul(torch.softmax(scores / 4.0, dim=-1), self.value(features))
        hidden = attended + self.queries
        return hidden + self.mlp(hidden)
