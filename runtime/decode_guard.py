"""Bounds on the memory that decoding a request's images may take (``edgecap serve``).

A PNG of a few kilobytes can decode to tens of megapixels, so the body limit says nothing
about memory. Three bounds, checked in this order:

* per image: ``max_image_pixels`` (the decoder's own guard, from the header: the size as
  stored, whatever scale it is decoded at);
* per request: the pixels of all its images together, read from their headers before any is
  decoded, so an over-budget request costs nothing but header parsing;
* per server: the pixels being decoded at once (``DecodeGate``), so concurrent requests queue
  for decoding instead of adding their peaks together.

The request and server budgets count the pixels the decoder will actually produce: a JPEG
decoded at a reduced scale (``preprocess.draft_jpeg``, unless ``exact_preprocessing``) is
counted at that scale, which is what it holds in memory.

Each decoded image is reduced to the model's input size at once (the same PIL resize the
captioner would do, so captions are unchanged): a waiting request holds small images only.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from contextlib import asynccontextmanager
from typing import AsyncIterator

from PIL import Image

from .errors import ImageError
from .manifest import Preprocessing
from .preprocess import ALLOWED_FORMATS, RESAMPLE, decode_image, draft_jpeg


class BudgetExceeded(ImageError):
    """A request whose images, together, have more pixels than one request may decode."""


def header_pixels(data: bytes, reduce_to: tuple[int, int] | None = None) -> int:
    """Width x height the decoder will produce, from the image header alone (no pixel data
    decoded): a JPEG's reduced scale with ``reduce_to`` as ``decode_image`` would pick it; 0
    when the header cannot be read, so that decoding reports the real problem."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the decoder's own bomb guard reports these
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
                draft_jpeg(image, reduce_to)  # sets the size the decoder will produce
                width, height = image.size
    except Exception:  # noqa: BLE001 - any unreadable header: decode_image names the reason
        return 0
    return max(width, 0) * max(height, 0)


def check_request_pixels(uploads: list[tuple[str, bytes]], budget: int,
                         reduce_to: tuple[int, int] | None = None) -> list[int]:
    """Each upload's decoded pixel count (``header_pixels``); raises before any decoding when
    their sum is over ``budget``.

    Raises:
        BudgetExceeded: the images together have more than ``budget`` pixels.
    """
    pixels = [header_pixels(data, reduce_to) for _, data in uploads]
    if sum(pixels) > budget:
        names = ", ".join(name for name, _ in uploads)
        raise BudgetExceeded(names, f"{len(uploads)} images of {sum(pixels)} pixels together; "
                                    f"one request may decode at most {budget} pixels")
    return pixels


class DecodeGate:
    """Admits decodes while the pixels being decoded at once stay within ``budget``.

    An image larger than the budget is admitted alone (the per-image limit bounds it), so the
    gate never refuses what the decoder accepts; it only makes it wait its turn.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.in_flight = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def admit(self, pixels: int, timeout_s: float) -> AsyncIterator[None]:
        """Hold ``pixels`` of the budget while the block runs.

        Raises:
            asyncio.TimeoutError: no room within ``timeout_s``.
        """
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self._fits(pixels)), timeout_s)
            self.in_flight += pixels
        try:
            yield
        finally:
            async with self._changed:
                self.in_flight -= pixels
                self._changed.notify_all()

    def _fits(self, pixels: int) -> bool:
        return self.in_flight == 0 or self.in_flight + pixels <= self.budget


def decode_for_model(data: bytes, name: str, max_pixels: int, preprocessing: Preprocessing,
                     reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``data`` (``reduce_to`` as for ``decode_image``) and resize it to the model's
    input size as ``to_pixels`` would.

    Raises:
        ImageError: the bytes cannot be decoded, or the image is over ``max_pixels``.
    """
    image = decode_image(data, name, max_pixels, reduce_to)
    size = (preprocessing.width, preprocessing.height)
    if preprocessing.do_resize and image.size != size:
        # The very call to_pixels makes, done here so that only the small image is kept.
        image = image.resize(size, RESAMPLE[preprocessing.resample])
    return image
