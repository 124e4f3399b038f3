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
    check_fusable(lm_model.config)
    tf = lm_model.transformer
    g = _StepGraph(lm_model.config)
    embedding = g.embed(tf.wte.weight, lm_model.lm_head.weight, tf.wpe.weight)
    g.group_cross_rows()
    x = g.first_norm(tf.h[0].ln_1)
    for i, block in enumerate(tf.h):
        x = g.self_attention(i, block, x)
        x = g.cross_attention(i, block, x)
        # The next layer's first norm takes this layer's residual; after the last, ln_f does.
        last = i + 1 == g.layers
        x = g.mlp(i, block, x, tf.ln_f if last else tf.h[i + 1].ln_1,
                  "ln_f" if last else f"h.{i + 1}.ln_1")
    g.logits(x, embedding)
    return g.model()


class _StepGraph(_Builder):
    """The fused step graph, layer by layer; ``hidden`` is the residual stream so far."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layers, self.heads, self.width = config.n_layer, config.n_head, config.n_embd
        self.head_dim = self.width // self.heads
        self.eps = float(config.layer_norm_epsilon)
        self.past, self.cross_kv = past_names(self.layers), cross_names(self.layers)
        self.present = present_names(self.layers)
        self.hidden = ""

    def embed(self, wte, head, wpe) -> str:
        """Token + position embedding into ``hidden``; returns the head's matrix."""
        # The head is a MatMul on "output_embedding" [width, vocab]. A tied embedding is that
        # same matrix, stored once: the lookup gathers its columns (the int8/int4 passes rewire
        # this Gather to share the quantized matrix). An untied one is its own table.
        tied = wte.data_ptr() == head.data_ptr()
        embedding = self.const("output_embedding", head.detach().float().numpy().T)
        if tied:
            columns = self.node("Gather", [embedding, INPUT_IDS], 1, "embed/gather", axis=1)[0]
            tokens = self.node("Transpose", [columns], 1, "embed/transpose", perm=[1, 2, 0])[0]
        else:
            table = self.param("wte", wte)
            tokens = self.node("Gather", [table, INPUT_IDS], 1, "embed/gather", axis=0)[0]
        # The new token's position is the cache length, read from the first cache's shape.
        position = self.node("Shape", [self.past[0]], 1, "embed/past_len", start=2, end=3)[0]
        positions = self.node("Gather", [self.param("wpe", wpe), position], 1, "embed/wpe",
                              axis=0)[0]
        self.hidden = self.node("Add", [tokens, positions], 1, "embed/add")[0]  # [rows, 1, width]
        return embedding

    def group_cross_rows(self) -> None:
        """Cross-attention groups an image's beams as that image's query rows:
        [images, beams, width]; these shapes group and ungroup them."""
        images = self.node("Shape", [self.cross_kv[0]], 1, "cross/images", start=0, end=1)[0]
        rest = self.const("cross/rest", np.array([-1, self.width], np.int64))
        self.grouped_shape = self.node("Concat", [images, rest], 1, "cross/grouped_shape",
                                       axis=0)[0]
        self.row_shape = self.const("cross/row_shape", np.array([-1, 1, self.width], np.int64))

    def linear(self, x: str, conv1d, name: str, with_bias: bool = False) -> str:
        inputs = [x, self.param(f"{name}.weight", conv1d.weight)]
        out = self.node("MatMul", inputs, 1, f"{name}/MatMul")[0]
        if with_bias:
            out = self.node("Add", [out, self.param(f"{name}.bias", conv1d.bias)], 1,
                            f"{name}/Add")[0]
        return out

    def scale_for(self, i: int) -> float:
        scale = 1.0 / float(self.head_dim) ** 0.5 if self.config.scale_attn_weights else 1.0
        return scale / float(i + 1) if self.config.scale_attn_by_inverse_layer_idx else scale

    def first_norm(self, norm) -> str:
        """The first layer norm has no residual to fold in; every later one is a
        SkipLayerNormalization that also returns the residual sum (its fourth output)."""
        weight, bias = self.param("h.0.ln_1.weight", norm.weight), self.param("h.0.ln_1.bias",
                                                                              norm.bias)
        return self.node("LayerNormalization", [self.hidden, weight, bias], 1, "h.0.ln_1",
                         axis=-1, epsilon=self.eps)[0]

    def skip_norm(self, update: str, norm, bias: str, name: str) -> str:
        """hidden += update + bias; returns norm(hidden). One kernel for add, add and norm."""
        outs = [f"{name}/out", "", "", f"{name}/residual"]
        self.node("SkipLayerNormalization",
                  [update, self.hidden, self.param(f"{name}.weight", norm.weight),
                   self.param(f"{name}.bias", norm.bias), bias], outs, name, domain=MS_DOMAIN,
                  epsilon=self.eps)
        self.hidden = outs[3]
        return outs[0]

    def self_attention(self, i: int, block, x: str) -> str:
        """One MatMul for q|k|v; MultiHeadAttention adds the bias, appends k/v to the cache
        (present_*), and attends with the new row over the whole cache."""
        p, width, attn = f"h.{i}", self.width, block.attn
        qkv = self.linear(x, attn.c_attn, f"{p}.attn.c_attn")
        q, k, v = self.node("Split", [qkv, self.const(f"{p}.attn/split",
                                                      np.array([width] * 3, np.int64))],
                            3, f"{p}.attn/split", axis=2)
        attended = self.node(
            "MultiHeadAttention",
            [q, k, v, self.param(f"{p}.attn.c_attn.bias", attn.c_attn.bias), "", "",
             self.past[2 * i], self.past[2 * i + 1]],
            [f"{p}.attn/out", self.present[2 * i], self.present[2 * i + 1]],
            f"{p}.attn/mha", domain=MS_DOMAIN, num_heads=self.heads, scale=self.scale_for(i))[0]
        update = self.linear(attended, attn.c_proj, f"{p}.attn.c_proj")
        return self.skip_norm(update, block.ln_cross_attn,
                              self.param(f"{p}.attn.c_proj.bias", attn.c_proj.bias),
                              f"{p}.ln_cross_attn")

    def cross_attention(self, i: int, block, x: str) -> str:
        """Against the image's precomputed K/V ([images, heads, S, head_dim])."""
        p, cross = f"h.{i}", block.crossattention
        query = self.linear(x, cross.q_attn, f"{p}.crossattention.q_attn", with_bias=True)
        query = self.node("Reshape", [query, self.grouped_shape], 1, f"{p}.crossattention/group")[0]
        attended = self.node("MultiHeadAttention", [query, self.cross_kv[2 * i],
                                                    self.cross_kv[2 * i + 1]], 1,
                             f"{p}.crossattention/mha", domain=MS_DOMAIN, num_heads=self.heads,
                             scale=self.scale_for(i))[0]
        attended = self.node("Reshape", [attended, self.row_shape], 1,
                             f"{p}.crossattention/ungroup")[0]
        update = self.linear(attended, cross.c_proj, f"{p}.crossattention.c_proj")
        return self.skip_norm(update, block.ln_2,
                              self.param(f"{p}.crossattention.c_proj.bias", cross.c_proj.bias),
                              f"{p}.ln_2")

    def mlp(self, i: int, block, x: str, next_norm, next_name: str) -> str:
        """The activation kernel takes the first projection's bias; ``next_norm`` (named
        ``next_name``) folds in the second's."""
        p, mlp = f"h.{i}", block.mlp
        up = self.linear(x, mlp.c_fc, f"{p}.mlp.c_fc")
        fc_bias = self.param(f"{p}.mlp.c_fc.bias", mlp.c_fc.bias)
        op = "FastGelu" if self.config.activation_function in FAST_GELU else "BiasGelu"
        activated = self.node(op, [up, fc_bias], 1, f"{p}.mlp.act", domain=MS_DOMAIN)[0]
        update = self.linear(activated, mlp.c_proj, f"{p}.mlp.c_proj")
        bias = self.param(f"{p}.mlp.c_proj.bias", mlp.c_proj.bias)
        return self.skip_norm(update, next_norm, bias, next_name)

    def logits(self, x: str, embedding: str) -> None:
        # Flatten the width-sized rows before the head, not the vocabulary-sized logits after
        # it: a Reshape of the logits would copy rows x vocabulary floats every step.
        rows = self.node("Reshape", [x, self.const("lm_head/rows",
                                                   np.array([-1, self.width], np.int64))], 1,
                         "lm_head/rows")[0]
        self.node("MatMul", [rows, embedding], [LOGITS], "lm_head/MatMul")

    def model(self) -> onnx.ModelProto:
        """The graph with its named, dynamically shaped inputs and outputs."""
        heads, head_dim = self.heads, self.head_dim

        def tensor(name: str, dims) -> onnx.ValueInfoProto:
            elem = TensorProto.INT64 if name == INPUT_IDS else TensorProto.FLOAT
            return helper.make_tensor_value_info(name, elem, dims)

        inputs = [tensor(INPUT_IDS, ["rows", 1])]
        inputs += [tensor(name, ["rows", heads, "past_len", head_dim]) for name in self.past]
        inputs += [tensor(name, ["images", heads, "encoder_len", head_dim])
                   for name in self.cross_kv]
        outputs = [tensor(LOGITS, ["rows", self.config.vocab_size])]
        outputs += [tensor(name, ["rows", heads, "total_len", head_dim]) for name in self.present]
        graph = helper.make_graph(self.nodes, "edgecap_decoder_step_fused", inputs, outputs,
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                         helper.make_opsetid(MS_DOMAIN, 1)])
        model.producer_name = "edgecap"
        return model
