"""Runs the two graphs: the encoder once per image, the decoder step once per token.

The decoder's self-attention cache and the per-image cross-attention K/V travel through
``DecoderState``; beam search and greedy decoding only ever call ``step`` and ``select``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .manifest import (
    INPUT_IDS, PIXEL_VALUES, Manifest, cross_names, decoder_output_names, past_names,
)


@dataclass
class DecoderState:
    """What one decoding run carries between steps (one row per hypothesis)."""

    past: list[np.ndarray]  # [rows, heads, t, head_dim] per layer, key then value
    cross: list[np.ndarray]  # [rows, heads, S, head_dim] per layer, key then value

    @property
    def rows(self) -> int:
        return self.past[0].shape[0]


class GraphRunner:
    """Owns the encoder and decoder sessions of one export and the names of their tensors."""

    def __init__(self, encoder: ort.InferenceSession, decoder: ort.InferenceSession, manifest: Manifest):
        self.encoder = encoder
        self.decoder = decoder
        self.manifest = manifest
        layers = manifest.num_layers
        self.cross_names = cross_names(layers)
        self.past_names = past_names(layers)
        self.output_names = decoder_output_names(layers)
        self._float_type = np.float16 if _is_fp16(decoder, self.past_names[0]) else np.float32

    def encode(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        """pixel_values [B, 3, H, W] -> cross-attention K/V for every decoder layer."""
        return self.encoder.run(self.cross_names, {PIXEL_VALUES: pixel_values})

    def start(self, cross: list[np.ndarray], repeats: int = 1) -> DecoderState:
        """A state with an empty cache for ``repeats`` hypotheses (beams) per image.

        Exports with ``shared_cross_kv`` take one cross K/V per image for all its beams; older
        ones need it repeated once per beam (done here, once, never per step).
        """
        rows = cross[0].shape[0] * repeats
        if repeats > 1 and not self.manifest.shared_cross_kv:
            cross = [np.repeat(c, repeats, axis=0) for c in cross]
        m = self.manifest
        empty = np.zeros((rows, m.num_heads, 0, m.head_dim), self._float_type)
        return DecoderState(past=[empty] * len(self.past_names), cross=cross)

    def decoder_feeds(self, state: DecoderState, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """The decoder step's inputs for one token per row, by tensor name."""
        feeds = {INPUT_IDS: tokens.reshape(-1, 1).astype(np.int64, copy=False)}
        feeds.update(zip(self.past_names, state.past))
        feeds.update(zip(self.cross_names, state.cross))
        return feeds

    def step(self, state: DecoderState, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row; returns logits [rows, vocab] (float32) and grows the cache."""
        logits, *state.past = self.decoder.run(self.output_names, self.decoder_feeds(state, tokens))
        return logits.astype(np.float32, copy=False)

    @staticmethod
    def select(state: DecoderState, rows: np.ndarray, cross_too: bool = True) -> None:
        """Keep (and reorder) the given rows of the cache, e.g. surviving beams or active images."""
        state.past = [p[rows] for p in state.past]
        if cross_too:
            state.cross = [c[rows] for c in state.cross]


def _is_fp16(session: ort.InferenceSession, name: str) -> bool:
    for tensor in session.get_inputs():
        if tensor.name == name:
            return tensor.type == "tensor(float16)"
    return False
