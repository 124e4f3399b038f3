"""Calibration data for static int8: encoder inputs from images, decoder inputs from the steps
those images produce when the fp32 export captions them greedily. Fixed order, no sampling:
the same folder always yields the same scales."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecap import Captioner
from edgecap.decoding import greedy_search
from edgecap.manifest import PIXEL_VALUES, GenerationOptions
from edgecap.preprocess import load_image, to_pixels
from edgecap.runner import DecoderState, GraphRunner

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


class RecordingRunner:
    """A ``GraphRunner`` for the runtime's own search that keeps every decoder step's feeds, so
    calibration sees exactly the inputs captioning produces (and the loop exists once)."""

    def __init__(self, runner: GraphRunner):
        self.runner = runner
        self.feeds: list[dict[str, np.ndarray]] = []

    def start(self, cross: list[np.ndarray], repeats: int = 1) -> DecoderState:
        return self.runner.start(cross, repeats)

    def step(self, state: DecoderState, tokens: np.ndarray) -> np.ndarray:
        # The step replaces state.past with new arrays, so the recorded ones stay as fed.
        self.feeds.append(self.runner.decoder_feeds(state, tokens))
        return self.runner.step(state, tokens)

    def select(self, state: DecoderState, rows: np.ndarray, cross_too: bool = True) -> None:
        self.runner.select(state, rows, cross_too)


def calibration_readers(fp32_dir: Path, images: list[Path]) -> tuple[ListReader, ListReader]:
    """Readers over the encoder feeds (one per image) and the decoder feeds of plain greedy
    captioning, image by image, at most MAX_DECODER_FEEDS steps in all."""
    captioner = Captioner(fp32_dir)
    runner, manifest = captioner.runner, captioner.manifest
    steps_per_image = max(1, MAX_DECODER_FEEDS // max(1, len(images)))
    # Argmax without penalties: scales should follow the model's own steps, not a decoding style.
    steps = min(steps_per_image, manifest.generation.max_new_tokens)
    options = GenerationOptions(max_new_tokens=steps)
    encoder_feeds, recorder = [], RecordingRunner(runner)
    for path in images:
        pixels = to_pixels(load_image(path), manifest.preprocessing)[None]
        encoder_feeds.append({PIXEL_VALUES: pixels})
        greedy_search(recorder, runner.encode(pixels), options, manifest.decoder_start_token_id,
                      manifest.eos_token_id)
    return ListReader(encoder_feeds), ListReader(recorder.feeds)


def calibration_images(folder: Path | None, count: int) -> list[Path]:
    """The first ``count`` images of ``folder`` (recursively, sorted by path)."""
    if folder is None or not Path(folder).is_dir():
        raise ValueError("int8-static needs --calibration DIR: a folder of representative images")
    suffixes = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
    images = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes)[:count]
    if not images:
        raise ValueError(f"{folder}: no images for calibration")
    return images
