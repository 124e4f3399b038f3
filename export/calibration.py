"""Calibration data for static int8: encoder inputs from images, decoder inputs from the steps
those images produce when the fp32 export captions them greedily. Fixed order, no sampling:
the same folder always yields the same scales."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecap import Captioner
from edgecap.preprocess import load_image, to_pixels

MAX_DECODER_FEEDS = 128  # bounds memory: each feed carries every layer's cross K/V


class ListReader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def calibration_readers(fp32_dir: Path, images: list[Path]) -> tuple[ListReader, ListReader]:
    captioner = Captioner(fp32_dir)
    runner, manifest = captioner.runner, captioner.manifest
    encoder_feeds, decoder_feeds = [], []
    steps_per_image = max(1, MAX_DECODER_FEEDS // max(1, len(images)))
    for path in images:
        pixels = to_pixels(load_image(path), manifest.preprocessing)[None]
        encoder_feeds.append({"pixel_values": pixels})
        state = runner.start(runner.encode(pixels))
        token = np.array([manifest.decoder_start_token_id], dtype=np.int64)
        for _ in range(min(steps_per_image, manifest.generation.max_new_tokens)):
            feeds = {"input_ids": token.reshape(1, 1)}
            feeds.update(zip(runner.past_names, state.past))
            feeds.update(zip(runner.cross_names, state.cross))
            decoder_feeds.append(feeds)
            token = runner.step(state, token).argmax(axis=-1)
            if token[0] == manifest.eos_token_id:
                break
    return ListReader(encoder_feeds), ListReader(decoder_feeds)
