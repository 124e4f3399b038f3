"""The graphs of a prefix-conditioned captioner (ClipCap style), as torch modules over its weights.

* ``PrefixEncoderGraph``: pixels -> image features -> mapper -> prefix embeddings [B, P, width],
  GPT-2 input embeddings that stand before the caption's tokens.
* ``PrefixStepGraph``: a plain GPT-2 (no cross-attention) step over ``prefix embeddings`` followed
  by ``token ids``, with each row's own self-attention cache and the image's prefix K/V. The
  runtime calls it once per image with the prefix and no token (the prefill, whose presents are
  the prefix K/V) and then with one token and an empty prefix per step, so one graph holds the
  weights for both. Like cross-attention K/V, an image's prefix K/V serve all of its beams
  without being copied per beam.

Export checks both against ``GPT2LMHeadModel`` before anything is written.
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import conv1d_linear, split_heads


class PrefixEncoderGraph(nn.Module):
    """pixel_values [B, 3, H, W] -> prefix_embeds [B, P, width]."""

    def __init__(self, image_encoder: nn.Module, mapper: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder
        self.mapper = mapper

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.image_encoder(pixel_values))


def check_prefix_decoder(config) -> None:
    """Fail early, with the reason, on GPT-2 variants the prefix step graph does not reproduce."""
    if getattr(config, "add_cross_attention", False):
        raise ValueError("decoder has cross-attention layers: export it with export_captioner")
    if getattr(config, "reorder_and_upcast_attn", False):
        raise ValueError("GPT2Config.reorder_and_upcast_attn=True is not supported")


class PrefixStepGraph(nn.Module):
    """A KV-cached GPT-2 step over [prefix embeddings, then token embeddings], whose image prefix
    is cached once per image and shared by that image's rows.

    Inputs: input_ids [N, T] int64, prefix_embeds [N, P, width], past_key_i / past_value_i
    [N, heads, L, head_dim] per layer (each row's own cache), then prefix_key_i /
    prefix_value_i [images, heads, C, head_dim] per layer: an already prefilled prefix, one per
    image for all of its N / images rows (rows grouped by image, as beams are). Positions
    continue from C + L.
    Outputs: logits [N, vocab] for the last position, then present_key_i / present_value_i
    [N, heads, L + P + T, head_dim].

    The runtime's prefill feeds the prefix, no token and empty caches (one row per image): its
    presents are the prefix K/V. Each later step feeds one token and an empty prefix.
    """

    def __init__(self, lm_model: nn.Module):
        super().__init__()
        config = lm_model.config
        check_prefix_decoder(config)
        self.transformer = lm_model.transformer
        self.num_layers = config.n_layer
        wte, lm_head = self.transformer.wte.weight, lm_model.lm_head.weight
        # As in DecoderStepGraph: one [width, vocab] copy of a tied embedding, gathered by column
        # for the input and multiplied for the head, so the largest tensor is stored once.
        self.tied = wte.data_ptr() == lm_head.data_ptr()
        self.output_embedding = nn.Parameter(lm_head.detach().t().contiguous(), requires_grad=False)
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.scale_by_layer = bool(config.scale_attn_by_inverse_layer_idx)
        self.scale_weights = bool(config.scale_attn_weights)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tied:
            return self.transformer.wte(input_ids)
        # A gather along the vocabulary axis, then [width, N, T] -> [N, T, width]; no reshape,
        # whose run-time shape would hold a zero (no tokens during the prefill) that ONNX
        # Reshape reads as "keep this dimension".
        return self.output_embedding[:, input_ids].permute(1, 2, 0)

    def scores(self, query, key, layer_idx: int) -> torch.Tensor:
        """GPT-2's attention scores: query @ key^T, divided as ``GPT2Attention`` divides them
        (ORT folds these divisions into the MatMul)."""
        scores = torch.matmul(query, key.transpose(-1, -2))
        if self.scale_weights:
            scores = scores / (self.head_dim**0.5)
        if self.scale_by_layer:
            scores = scores / float(layer_idx + 1)
        return scores

    def attend(self, query, key, value, prefix_key, prefix_value, visible, sizes,
               layer_idx: int) -> torch.Tensor:
        """Causal self-attention over [the image's prefix K/V, then the row's own K/V].

        query [N, heads, Q, d]; key/value [N, heads, L, d]; prefix_key/value [images, heads,
        C, d]; ``visible`` [Q, C + L]; ``sizes`` (images, C, Q, L) as traced sizes. The rows of
        an image become one group ([images, rows per image, heads, ...]) and the prefix gets a
        broadcast axis there, so its K/V are never repeated per row. One softmax spans both key
        sets: exactly attention over the concatenated sequence. Returns [N, Q, width].
        """
        images, cached, new_len, own_len = sizes
        heads, head_dim = self.num_heads, self.head_dim
        # No size in these shapes is zero at run time (a query always has a position, and so
        # has its own key), which ONNX Reshape would read as "keep this dimension".
        grouped = query.reshape(images, -1, heads, new_len, head_dim)
        own_key = key.reshape(images, -1, heads, own_len, head_dim)
        own_value = value.reshape(images, -1, heads, own_len, head_dim)
        scores = torch.cat([self.scores(grouped, prefix_key.unsqueeze(1), layer_idx),
                            self.scores(grouped, own_key, layer_idx)], dim=-1)
        probs = torch.softmax(torch.where(visible, scores, torch.finfo(scores.dtype).min), dim=-1)
        attended = (torch.matmul(probs[..., :cached], prefix_value.unsqueeze(1))
                    + torch.matmul(probs[..., cached:], own_value))
        # [images, rows per image, heads, Q, d] -> [N, Q, heads * d]
        return attended.transpose(2, 3).reshape(-1, new_len, heads * head_dim)

    def forward(self, input_ids: torch.Tensor, prefix_embeds: torch.Tensor,
                *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tf = self.transformer
        past, prefix = caches[: 2 * self.num_layers], caches[2 * self.num_layers :]
        hidden = torch.cat([prefix_embeds, self.embed_tokens(input_ids)], dim=1)
        # Lengths read from the inputs' shapes once, as traced sizes, so the graph computes them
        # at run time (Python ints would be frozen in as the sample's) and every layer shares
        # them instead of recomputing its own.
        images, cached = prefix[0].shape[0], prefix[0].shape[2]
        past_len, new_len = past[0].shape[2], hidden.shape[1]
        sizes = (images, cached, new_len, past_len + new_len)
        positions = torch.arange(new_len) + (cached + past_len)
        hidden = hidden + tf.wpe(positions).unsqueeze(0)
        # The prefill sees several new positions at once: each may see keys up to its own.
        visible = torch.arange(cached + past_len + new_len).unsqueeze(0) <= positions.unsqueeze(1)
        presents = []
        for i, block in enumerate(tf.h):
            x = block.ln_1(hidden)
            qkv = conv1d_linear(x, block.attn.c_attn)
            query, key, value = qkv.split(block.attn.split_size, dim=2)
            key = torch.cat([past[2 * i], split_heads(key, self.num_heads)], dim=2)
            value = torch.cat([past[2 * i + 1], split_heads(value, self.num_heads)], dim=2)
            presents += [key, value]
            attended = self.attend(split_heads(query, self.num_heads), key, value, prefix[2 * i],
                                   prefix[2 * i + 1], visible, sizes, i)
            hidden = hidden + conv1d_linear(attended, block.attn.c_proj)
            x = block.ln_2(hidden)
            x = block.mlp.act(conv1d_linear(x, block.mlp.c_fc))
            hidden = hidden + conv1d_linear(x, block.mlp.c_proj)
        hidden = tf.ln_f(hidden)[:, -1, :]
        return (torch.matmul(hidden, self.output_embedding), *presents)
