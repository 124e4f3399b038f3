"""Runs the two graphs: the encoder once per image, the decoder step once per token.

The decoder's self-attention cache and the per-image cross-attention K/V travel through
``DecoderState``; beam search and greedy decoding only ever call ``step`` and ``select``.
Both conditionings (``Manifest.conditioning``) look the same from above: for a prefix model,
``start`` runs the prefix embeddings through the step graph once per image (the prefill), keeps
the prefix's K/V per image where cross-attention K/V would be, and the first ``step`` returns
the logits that prefill computed (the token fed with it is the placeholder start slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .manifest import (
    GROUNDING_OUTPUTS, INPUT_IDS, PIXEL_VALUES, PREFIX, PREFIX_EMBEDS, Manifest,
    decoder_output_names, past_names, prefix_kv_names,
)


@dataclass
class DecoderState:
    """What one decoding run carries between steps (one row per hypothesis)."""

    past: list[np.ndarray]  # [rows, heads, t, head_dim] per layer, key then value
    # What each row attends to besides its own cache, per layer, key then value: cross-attention
    # K/V, or a prefix model's prefix K/V. [images, heads, S, head_dim] when an image's beams
    # share them (rows grouped by image), [rows, ...] for older cross-attention exports.
    cross: list[np.ndarray]
    # Logits already computed for the next step (the prefix prefill's last position), or None.
    pending: np.ndarray | None = None
    # Leading sequence positions the model saw as tokens: the decoder start token (1), or none (0)
    # when the start slot is a placeholder for a prefix; the logits processors skip placeholders.
    prompt_len: int = 1

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
        self.prefix = manifest.conditioning == PREFIX
        self.encoder_names = manifest.encoder_output_names()
        self.cross_names = prefix_kv_names(layers) if self.prefix else self.encoder_names
        self.past_names = past_names(layers)
        self.output_names = decoder_output_names(layers)
        self._float_type = np.float16 if _is_fp16(decoder, self.past_names[0]) else np.float32

    def encode(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        """pixel_values [B, 3, H, W] -> cross-attention K/V for every decoder layer, or
        ``[prefix_embeds]`` [B, P, width] for a prefix model (batch first either way)."""
        return self.encoder.run(self.encoder_names, {PIXEL_VALUES: pixel_values})

    def encode_grounded(self, pixel_values: np.ndarray) -> tuple[list, list[np.ndarray]]:
        """As ``encode``, plus a grounded encoder's presence, tag ids and tag scores (host
        arrays), from the same run."""
        outputs = self.encoder.run(self.encoder_names + list(GROUNDING_OUTPUTS),
                                   {PIXEL_VALUES: pixel_values})
        return outputs[: len(self.encoder_names)], outputs[len(self.encoder_names) :]

    def start(self, cross: list[np.ndarray], repeats: int = 1) -> DecoderState:
        """A state with an empty cache for ``repeats`` hypotheses (beams) per image.

        Exports with ``shared_cross_kv`` take one cross K/V per image for all its beams; older
        ones need it repeated once per beam (done here, once, never per step). A prefix model's
        ``cross`` is ``[prefix_embeds]``, prefilled here into per-image prefix K/V.
        """
        if self.prefix:
            return self._prefill(cross[0], repeats)
        rows = cross[0].shape[0] * repeats
        if repeats > 1 and not self.manifest.shared_cross_kv:
            cross = self._take_rows(cross, np.repeat(np.arange(cross[0].shape[0]), repeats))
        return DecoderState(past=self._empty_cache(rows), cross=cross)

    def _empty_cache(self, rows: int) -> list[np.ndarray]:
        m = self.manifest
        empty = np.zeros((rows, m.num_heads, 0, m.head_dim), self._float_type)
        return [empty] * len(self.past_names)

    def _prefill(self, prefix: np.ndarray, repeats: int) -> DecoderState:
        """Run the prefix embeddings [images, P, width] through the step graph once per image.

        Its presents are the prefix's K/V [images, heads, P, head_dim]: they are kept once per
        image, like cross K/V, and the graph lets the image's beams read them by broadcasting,
        so each row's own cache holds only its generated tokens and no step copies the prefix.
        """
        images = prefix.shape[0]
        empty = self._empty_cache(images)
        feeds = {INPUT_IDS: np.zeros((images, 0), np.int64),
                 PREFIX_EMBEDS: prefix.astype(self._float_type, copy=False)}
        feeds.update(zip(self.past_names, empty))
        feeds.update(zip(self.cross_names, empty))
        logits, prefix_kv = self._run_decoder(feeds)
        # Every beam starts from its image's last prefix position (rows grouped by image).
        pending = np.repeat(logits, repeats, axis=0) if repeats > 1 else logits
        return DecoderState(past=self._empty_cache(images * repeats), cross=prefix_kv,
                            pending=pending, prompt_len=0)

    def decoder_feeds(self, state: DecoderState, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """The decoder step's inputs for one token per row, by tensor name."""
        feeds = {INPUT_IDS: tokens.reshape(-1, 1).astype(np.int64, copy=False)}
        if self.prefix:  # after the prefill, the prefix input is empty
            width = self.manifest.num_heads * self.manifest.head_dim
            feeds[PREFIX_EMBEDS] = np.zeros((state.rows, 0, width), self._float_type)
        feeds.update(zip(self.past_names, state.past))
        feeds.update(zip(self.cross_names, state.cross))
        return feeds

    def step(self, state: DecoderState, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row; returns logits [rows, vocab] (float32) and grows the cache.

        After a prefix prefill the first call returns the prefill's logits and feeds nothing:
        its token is the placeholder start slot, which the model never sees."""
        if state.pending is not None:
            logits, state.pending = state.pending, None
        else:
            logits, state.past = self._run_decoder(self.decoder_feeds(state, tokens))
        return logits.astype(np.float32, copy=False)

    def select(self, state: DecoderState, rows: np.ndarray, cross_too: bool = True) -> None:
        """Keep (and reorder) the given rows of the cache, e.g. surviving beams or active images.

        ``cross_too``: the rows are images leaving or staying (one row per image, as in greedy
        search), so the per-image K/V follow them; False when beams are reordered within their
        images, whose K/V stay where they are.
        """
        kept = self._take_rows(state.past + (state.cross if cross_too else []), rows)
        state.past, cross = kept[: len(state.past)], kept[len(state.past) :]
        if cross_too:
            state.cross = cross

    # The two places tensors are touched, apart from the empty cache: device_runner.py
    # overrides them (with _empty_cache and encode) to keep the cache on the device.
    def _run_decoder(self, feeds: dict) -> tuple[np.ndarray, list]:
        """One decoder run: logits [rows, vocab] on the host, and the grown cache."""
        logits, *past = self.decoder.run(self.output_names, feeds)
        return logits, past

    def _take_rows(self, tensors: list, rows: np.ndarray) -> list:
        """The given rows of every tensor, in that order (rows may repeat)."""
        return [t[rows] for t in tensors]


def _is_fp16(session: ort.InferenceSession, name: str) -> bool:
    for tensor in session.get_inputs():
        if tensor.name == name:
            return tensor.type == "tensor(float16)"
    return False
