"""The two graphs edgecap exports, written as torch modules over a GPT-2 decoder's own weights.

* ``EncoderGraph``: pixels -> every decoder layer's cross-attention keys and values, so the
  cross-attention projections run once per image instead of once per generated token.
* ``DecoderStepGraph``: one new token per row + the self-attention cache -> logits for that token
  and the cache grown by one. The same graph serves the first step (cache of length 0) and every
  later one, so the weights exist once on disk and in memory.

Both reuse the Hugging Face modules' parameters (no copies) and mirror ``GPT2Block.forward`` for
a single query position; export checks them against ``transformers`` before anything is written.
"""

from __future__ import annotations

import torch
from torch import nn

from edgecap.manifest import cross_names, decoder_input_names, decoder_output_names


def conv1d_linear(x: torch.Tensor, conv1d: nn.Module) -> torch.Tensor:
    """GPT-2's ``Conv1D`` (weight stored [in, out]) as MatMul + Add: the pattern int8 quantizers and
    ORT's fusions recognise, instead of the ``addmm`` over a flattened view that Conv1D emits."""
    return torch.matmul(x, conv1d.weight) + conv1d.bias


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]."""
    batch, seq, width = x.shape
    return x.reshape(batch, seq, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def check_supported_decoder(config) -> None:
    """Fail early, with the reason, on GPT-2 variants the step graph does not reproduce."""
    if not getattr(config, "add_cross_attention", False):
        raise ValueError("decoder has no cross-attention layers (GPT2Config.add_cross_attention=False)")
    if getattr(config, "reorder_and_upcast_attn", False):
        raise ValueError("GPT2Config.reorder_and_upcast_attn=True is not supported")


class EncoderGraph(nn.Module):
    """pixel_values [B, 3, H, W] -> (cross_key_0, cross_value_0, ...), each [B, heads, S, head_dim].

    ``encode`` is any callable returning encoder states [B, S, decoder_width] (for a Hugging Face
    VisionEncoderDecoderModel: the vision encoder's last hidden state, then ``enc_to_dec_proj``).
    """

    def __init__(self, encode: nn.Module, decoder_blocks: nn.ModuleList, num_heads: int):
        super().__init__()
        self.encode = encode
        self.blocks = decoder_blocks
        self.num_heads = num_heads

    @property
    def grounded(self) -> bool:
        """True when ``encode`` has presence heads: the graph then also emits the grounding
        outputs (edgecap.manifest.GROUNDING_OUTPUTS) after the cross K/V."""
        return getattr(self.encode, "presence", None) is not None

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        extras: tuple[torch.Tensor, ...] = ()
        if self.grounded:
            states, extras = self.encode.grounded(pixel_values)
        else:
            states = self.encode(pixel_values)
        outputs = []
        for block in self.blocks:
            cross = block.crossattention
            key, value = conv1d_linear(states, cross.c_attn).split(cross.split_size, dim=2)
            outputs += [split_heads(key, self.num_heads), split_heads(value, self.num_heads)]
        return tuple(outputs) + tuple(extras)


class HFVisionEncoder(nn.Module):
    """A VisionEncoderDecoderModel's encoder half: vision model + optional width projection."""

    def __init__(self, vision_model: nn.Module, projection: nn.Module | None):
        super().__init__()
        self.vision_model = vision_model
        self.projection = projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        return self.projection(states) if self.projection is not None else states


class DecoderStepGraph(nn.Module):
    """One KV-cached GPT-2 step with cross-attention.

    Inputs: input_ids [N, 1] int64, then past_key_i / past_value_i [N, heads, T, head_dim] for every
    layer, then cross_key_i / cross_value_i [images, heads, S, head_dim] where N = images * beams
    (rows grouped by image: an image's beams are consecutive). The new token's position is the
    cache length T, read from the cache's shape (all rows of a batch share it).
    Outputs: logits [N, vocab] for the new token, then present_key_i / present_value_i
    [N, heads, T + 1, head_dim].
    """

    def __init__(self, lm_model: nn.Module):
        super().__init__()
        config = lm_model.config
        check_supported_decoder(config)
        self.transformer = lm_model.transformer
        wte, lm_head = self.transformer.wte.weight, lm_model.lm_head.weight
        # GPT-2 ties the LM head to the token embedding. The exporter would store the head as a
        # separate transposed constant, doubling the largest tensor, so keep one [width, vocab]
        # copy: the head is a plain MatMul on it (the pattern int8 quantizers handle) and the
        # embedding lookup gathers its columns.
        self.tied = wte.data_ptr() == lm_head.data_ptr()
        self.output_embedding = nn.Parameter(lm_head.detach().t().contiguous(), requires_grad=False)
        self.num_layers = config.n_layer
        self.num_heads = config.n_head
        self.scale_by_layer = bool(config.scale_attn_by_inverse_layer_idx)
        self.scale_weights = bool(config.scale_attn_weights)

    def attend(self, query, key, value, layer_idx: int) -> torch.Tensor:
        scores = torch.matmul(query, key.transpose(-1, -2))
        if self.scale_weights:
            scores = scores / (value.shape[-1] ** 0.5)
        if self.scale_by_layer:
            scores = scores / float(layer_idx + 1)
        # One query position that may see every cached key: no causal mask is needed.
        return merge_heads(torch.matmul(torch.softmax(scores, dim=-1), value))

    def attend_shared(self, query, key, value, layer_idx: int) -> torch.Tensor:
        """Cross-attention with one K/V per image shared by its beams.

        query [images * beams, heads, 1, head_dim]; key/value [images, heads, S, head_dim]. The
        beams of an image become that image's query rows ([images, heads, beams, head_dim]), so
        the per-image K/V is never repeated in memory and is read once per step, not per beam.
        """
        # The tracer records these sizes as shape ops, so images and beams stay dynamic.
        grouped = query.reshape(key.shape[0], -1, query.shape[1], query.shape[3])
        grouped = grouped.transpose(1, 2)  # [images, heads, beams, head_dim]
        scores = torch.matmul(grouped, key.transpose(-1, -2))
        if self.scale_weights:
            scores = scores / (value.shape[-1] ** 0.5)
        if self.scale_by_layer:
            scores = scores / float(layer_idx + 1)
        attended = torch.matmul(torch.softmax(scores, dim=-1), value)  # [images, heads, beams, d]
        return attended.transpose(1, 2).reshape(query.shape[0], 1, -1)  # [images*beams, 1, h*d]

    def forward(self, input_ids: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self.num_layers
        past, cross = caches[: 2 * layers], caches[2 * layers :]
        # The cache length as a tensor op, so the traced graph reads it at run time (a Python int
        # would be frozen into the graph as the sample's length).
        past_len = torch._shape_as_tensor(past[0])[2]
        tf = self.transformer
        if self.tied:
            token_embeds = torch.index_select(self.output_embedding, 1, input_ids.reshape(-1))
            token_embeds = token_embeds.t().unsqueeze(1)
        else:
            token_embeds = tf.wte(input_ids)
        hidden = token_embeds + tf.wpe(past_len.expand(input_ids.shape))
        presents = []
        for i, block in enumerate(tf.h):
            x = block.ln_1(hidden)
            query, key, value = conv1d_linear(x, block.attn.c_attn).split(block.attn.split_size, dim=2)
            key = torch.cat([past[2 * i], split_heads(key, self.num_heads)], dim=2)
            value = torch.cat([past[2 * i + 1], split_heads(value, self.num_heads)], dim=2)
            presents += [key, value]
            attended = self.attend(split_heads(query, self.num_heads), key, value, i)
            hidden = hidden + conv1d_linear(attended, block.attn.c_proj)

            x = block.ln_cross_attn(hidden)
            query = split_heads(conv1d_linear(x, block.crossattention.q_attn), self.num_heads)
            attended = self.attend_shared(query, cross[2 * i], cross[2 * i + 1], i)
            hidden = hidden + conv1d_linear(attended, block.crossattention.c_proj)

            x = block.ln_2(hidden)
            x = block.mlp.act(conv1d_linear(x, block.mlp.c_fc))
            hidden = hidden + conv1d_linear(x, block.mlp.c_proj)
        hidden = tf.ln_f(hidden)[:, -1, :]
        logits = torch.matmul(hidden, self.output_embedding)
        return (logits, *presents)


def input_output_names(num_layers: int) -> tuple[list[str], list[str], list[str]]:
    """(encoder outputs, decoder inputs, decoder outputs) names, in graph order: the runtime's
    contract from ``edgecap.manifest``, so both sides spell every tensor the same way."""
    return (cross_names(num_layers), decoder_input_names(num_layers),
            decoder_output_names(num_layers))
