"""The decoder step graph written directly in ONNX with ONNX Runtime's fused transformer ops.

Same inputs, outputs and maths as ``graphs.DecoderStepGraph`` (the traced version), but each layer
is about a dozen nodes instead of ~70: ``MultiHeadAttention`` (com.microsoft) does the head split,
scaled scores, softmax, weighted sum and KV-cache append in one kernel, ``SkipLayerNormalization``
folds the residual add and bias into the next layer norm, and ``FastGelu`` takes the MLP bias.
Fewer nodes means less per-node executor overhead, which weighs most in small decoders; in
large ones the weights dominate (measurements in docs/export.md).

Every weight-bearing product stays a plain ``MatMul`` on a constant, so the int8 and int4
quantizers handle the graph unchanged. Export runs the same parity check against PyTorch as for
the traced graph before anything is written.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecap.manifest import INPUT_IDS, LOGITS, cross_names, past_names, present_names

from .modules import check_supported_decoder

MS_DOMAIN = "com.microsoft"
# Bumped when the fused graph changes in a way worth re-exporting for (recorded in the manifest's
# provenance). 2: the LM head reads flattened rows (no Reshape copy of the logits).
FUSED_GRAPH_REVISION = 2
# gelu_new / gelu_pytorch_tanh are the tanh approximation FastGelu computes; "gelu" is exact erf.
FAST_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
EXACT_GELU = ("gelu",)


class UnsupportedForFusion(ValueError):
    """The decoder uses a feature the fused graph does not reproduce; use the traced graph."""


def check_fusable(config) -> None:
    check_supported_decoder(config)
    act = config.activation_function
    if act not in FAST_GELU + EXACT_GELU:
        raise UnsupportedForFusion(f"activation {act!r} has no fused ONNX Runtime kernel here")


class _Builder:
    """Collects nodes and initializers; names come from the caller so the graph reads like GPT-2."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, array) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def param(self, name: str, tensor) -> str:
        return self.const(name, tensor.detach().cpu().float().numpy())

    def node(self, op: str, inputs: list[str], outputs: list[str] | int, name: str,
             domain: str = "", **attrs) -> list[str]:
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" if i else f"{name}/out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None,
                                           **attrs))
        return outputs


def build_fused_step(lm_model) -> onnx.ModelProto:
    """GPT2LMHeadModel (with cross-attention) -> the decoder step graph as an ONNX model."""
    config = lm_model.config
    check_fusable(config)
    tf = lm_model.transformer
    layers, heads, width = config.n_layer, config.n_head, config.n_embd
    head_dim = width // heads
    eps = float(config.layer_norm_epsilon)
    past, cross_kv, present = past_names(layers), cross_names(layers), present_names(layers)
    b = _Builder()

    # The head is a MatMul on "output_embedding" [width, vocab]. A tied embedding is that same
    # matrix, stored once: the lookup gathers its columns (the int8/int4 passes rewire this Gather
    # to share the quantized matrix). An untied one is its own table.
    wte, head = tf.wte.weight, lm_model.lm_head.weight
    tied = wte.data_ptr() == head.data_ptr()
    embedding = b.const("output_embedding", head.detach().float().numpy().T)
    if tied:
        columns = b.node("Gather", [embedding, INPUT_IDS], 1, "embed/gather", axis=1)[0]
        tokens = b.node("Transpose", [columns], 1, "embed/transpose", perm=[1, 2, 0])[0]
    else:
        table = b.param("wte", wte)
        tokens = b.node("Gather", [table, INPUT_IDS], 1, "embed/gather", axis=0)[0]
    # The new token's position is the cache length, read from the first cache's shape.
    position = b.node("Shape", [past[0]], 1, "embed/past_len", start=2, end=3)[0]
    positions = b.node("Gather", [b.param("wpe", tf.wpe.weight), position], 1, "embed/wpe", axis=0)[0]
    hidden = b.node("Add", [tokens, positions], 1, "embed/add")[0]  # [rows, 1, width]

    # Cross-attention groups an image's beams as that image's query rows: [images, beams, width].
    images = b.node("Shape", [cross_kv[0]], 1, "cross/images", start=0, end=1)[0]
    grouped_shape = b.node("Concat", [images, b.const("cross/rest", np.array([-1, width], np.int64))],
                           1, "cross/grouped_shape", axis=0)[0]
    row_shape = b.const("cross/row_shape", np.array([-1, 1, width], np.int64))

    def linear(x: str, conv1d, name: str, with_bias: bool = False) -> str:
        inputs = [x, b.param(f"{name}.weight", conv1d.weight)]
        out = b.node("MatMul", inputs, 1, f"{name}/MatMul")[0]
        if with_bias:
            out = b.node("Add", [out, b.param(f"{name}.bias", conv1d.bias)], 1, f"{name}/Add")[0]
        return out

    def scale_for(i: int) -> float:
        scale = 1.0 / float(head_dim) ** 0.5 if config.scale_attn_weights else 1.0
        return scale / float(i + 1) if config.scale_attn_by_inverse_layer_idx else scale

    # The first layer norm has no residual to fold in; every later one is a SkipLayerNormalization
    # that also returns the residual sum (its fourth output).
    first = tf.h[0].ln_1
    x = b.node("LayerNormalization", [hidden, b.param("h.0.ln_1.weight", first.weight),
                                      b.param("h.0.ln_1.bias", first.bias)], 1,
               "h.0.ln_1", axis=-1, epsilon=eps)[0]

    def skip_norm(update: str, norm, bias: str, name: str) -> str:
        """hidden += update + bias; returns norm(hidden). One kernel for add, add and norm."""
        nonlocal hidden
        outs = [f"{name}/out", "", "", f"{name}/residual"]
        b.node("SkipLayerNormalization",
               [update, hidden, b.param(f"{name}.weight", norm.weight), b.param(f"{name}.bias", norm.bias),
                bias], outs, name, domain=MS_DOMAIN, epsilon=eps)
        hidden = outs[3]
        return outs[0]

    for i, block in enumerate(tf.h):
        p = f"h.{i}"
        # Self-attention: one MatMul for q|k|v; MultiHeadAttention adds the bias, appends k/v to
        # the cache (present_*), and attends with the new row over the whole cache.
        qkv = linear(x, block.attn.c_attn, f"{p}.attn.c_attn")
        q, k, v = b.node("Split", [qkv, b.const(f"{p}.attn/split", np.array([width] * 3, np.int64))],
                         3, f"{p}.attn/split", axis=2)
        attended = b.node(
            "MultiHeadAttention",
            [q, k, v, b.param(f"{p}.attn.c_attn.bias", block.attn.c_attn.bias), "", "",
             past[2 * i], past[2 * i + 1]],
            [f"{p}.attn/out", present[2 * i], present[2 * i + 1]],
            f"{p}.attn/mha", domain=MS_DOMAIN, num_heads=heads, scale=scale_for(i))[0]
        update = linear(attended, block.attn.c_proj, f"{p}.attn.c_proj")
        x = skip_norm(update, block.ln_cross_attn, b.param(f"{p}.attn.c_proj.bias", block.attn.c_proj.bias),
                         f"{p}.ln_cross_attn")

        # Cross-attention against the image's precomputed K/V ([images, heads, S, head_dim]).
        cross = block.crossattention
        query = linear(x, cross.q_attn, f"{p}.crossattention.q_attn", with_bias=True)
        query = b.node("Reshape", [query, grouped_shape], 1, f"{p}.crossattention/group")[0]
        attended = b.node("MultiHeadAttention", [query, cross_kv[2 * i], cross_kv[2 * i + 1]], 1,
                          f"{p}.crossattention/mha", domain=MS_DOMAIN, num_heads=heads,
                          scale=scale_for(i))[0]
        attended = b.node("Reshape", [attended, row_shape], 1, f"{p}.crossattention/ungroup")[0]
        update = linear(attended, cross.c_proj, f"{p}.crossattention.c_proj")
        x = skip_norm(update, block.ln_2, b.param(f"{p}.crossattention.c_proj.bias", cross.c_proj.bias),
                         f"{p}.ln_2")

        # MLP: the activation kernel takes the first projection's bias.
        mlp = block.mlp
        up = linear(x, mlp.c_fc, f"{p}.mlp.c_fc")
        fc_bias = b.param(f"{p}.mlp.c_fc.bias", mlp.c_fc.bias)
        if config.activation_function in FAST_GELU:
            activated = b.node("FastGelu", [up, fc_bias], 1, f"{p}.mlp.act", domain=MS_DOMAIN)[0]
        else:
            activated = b.node("BiasGelu", [up, fc_bias], 1, f"{p}.mlp.act", domain=MS_DOMAIN)[0]
        update = linear(activated, mlp.c_proj, f"{p}.mlp.c_proj")
        bias = b.param(f"{p}.mlp.c_proj.bias", mlp.c_proj.bias)
        if i + 1 < layers:  # the next layer's first norm takes this layer's residual
            x = skip_norm(update, tf.h[i + 1].ln_1, bias, f"h.{i + 1}.ln_1")
        else:
            x = skip_norm(update, tf.ln_f, bias, "ln_f")

    # Flatten the width-sized rows before the head, not the vocabulary-sized logits after it:
    # a Reshape of the logits would copy rows x vocabulary floats every step.
    rows = b.node("Reshape", [x, b.const("lm_head/rows", np.array([-1, width], np.int64))], 1,
                  "lm_head/rows")[0]
    b.node("MatMul", [rows, embedding], [LOGITS], "lm_head/MatMul")

    def tensor(name: str, dims) -> onnx.ValueInfoProto:
        elem = TensorProto.INT64 if name == INPUT_IDS else TensorProto.FLOAT
        return helper.make_tensor_value_info(name, elem, dims)

    inputs = [tensor(INPUT_IDS, ["rows", 1])]
    inputs += [tensor(name, ["rows", heads, "past_len", head_dim]) for name in past]
    inputs += [tensor(name, ["images", heads, "encoder_len", head_dim]) for name in cross_kv]
    outputs = [tensor(LOGITS, ["rows", config.vocab_size])]
    outputs += [tensor(name, ["rows", heads, "total_len", head_dim]) for name in present]
    graph = helper.make_graph(b.nodes, "edgecap_decoder_step_fused", inputs, outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid(MS_DOMAIN, 1)])
    model.producer_name = "edgecap"
    return model
