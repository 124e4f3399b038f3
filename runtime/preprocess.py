"""Image loading and pixel preprocessing in numpy + PIL, driven by the manifest.

Equivalent to Hugging Face's ``ViTImageProcessor`` for the same parameters: PIL resize of the
8-bit RGB image, then rescale and per-channel normalize in float, channels first.

Decoding at the size the model needs: given ``reduce_to`` (the model's input size), an image at
least twice that size on both sides (and at least ``2 * MIN_DECODED_SIDE``) may be decoded at a
reduced scale that still covers it (JPEG: libjpeg's DCT scaling, 1/2, 1/4 or 1/8), and then
takes the same resize as always. A full-size decode of a 4K photo costs many times the model for
pixels the resize throws away. Smaller images, and every image with ``reduce_to=None``, keep
exact pixels (docs/options.md).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Iterator, Union

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from .errors import ImageError
from .manifest import Preprocessing

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Formats we let PIL open: decoders outside this list never see untrusted bytes.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# File names taken as images when a folder is walked (caption, watch, eval, calibration).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Background that transparent pixels are composited on (white, as a viewer would show them).
ALPHA_BACKGROUND = (255, 255, 255)
# Modes converted band by band (see to_rgb) and the size of a band: temporaries stay small.
WIDE_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
BAND_PIXELS = 1 << 20
# The scales libjpeg can decode at (Pillow's draft mode): 1/8, 1/4, 1/2 of each side.
JPEG_SCALES = (8, 4, 2)
# A reduced decode keeps at least this many pixels a side, whatever the model's input: a full
# decode of an image smaller than twice this is a small fraction of the model's time, too little
# to trade exact pixels (and parity with transformers' processors) for, even for tiny models.
MIN_DECODED_SIDE = 256
# EXIF orientations that swap width and height (transposes and quarter turns).
SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})


def describe(source: ImageInput) -> str:
    """A short name for an input, used in error messages and results."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.size[0]}x{source.size[1]} {source.mode}>"
    if isinstance(source, np.ndarray):
        return f"<array {tuple(source.shape)} {source.dtype}>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageInput, max_pixels: int = 50_000_000,
               reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Open any supported input as an RGB PIL image, EXIF orientation applied.

    Args:
        source: a path, encoded bytes, a PIL image or an HxWxC array.
        max_pixels: the largest image accepted (width x height as stored in the file).
        reduce_to: (width, height) an encoded JPEG may be decoded down towards, never below,
            when it is at least twice that size (``reduction``); None: always full size.
            Images given already decoded (PIL, arrays) are returned at their own size.
    Raises:
        ImageError: the input cannot be read or decoded; the message says which and why.
    """
    name = describe(source)
    if isinstance(source, Image.Image):
        return to_rgb(source, name)
    if isinstance(source, np.ndarray):
        return to_rgb(_from_array(source, name), name)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            raise ImageError(name, "is a directory, not an image file")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(name, "file not found") from None
        except PermissionError:
            raise ImageError(name, "permission denied") from None
        except OSError as exc:
            raise ImageError(name, f"cannot read file ({exc.strerror or exc})") from None
    elif isinstance(source, bytes):
        data = source
    else:
        raise ImageError(name, "unsupported input type (give a path, bytes, PIL image or array)")
    return decode_image(data, name, max_pixels, reduce_to)


def reduction(size: tuple[int, int], reduce_to: tuple[int, int] | None) -> int:
    """The whole factor an image of ``size`` may shrink by and still cover ``reduce_to`` (and
    ``MIN_DECODED_SIDE``) on both sides: 1, exact pixels, without ``reduce_to`` or below twice
    that size."""
    if reduce_to is None:
        return 1
    width, height = (max(side, MIN_DECODED_SIDE) for side in reduce_to)
    return max(1, min(size[0] // width, size[1] // height))


def draft_jpeg(image: Image.Image, reduce_to: tuple[int, int] | None) -> int:
    """Put an opened, not yet loaded JPEG in draft mode at the largest DCT scale ``reduction``
    allows; returns that scale (1: decoded at full size, exactly as without it)."""
    if reduce_to is None or not isinstance(image, JpegImagePlugin.JpegImageFile):
        return 1
    if image.getexif().get(0x0112) in SWAPPED_ORIENTATIONS:  # reduce_to is after the rotation
        reduce_to = (reduce_to[1], reduce_to[0])
    factor = reduction(image.size, reduce_to)
    scale = next((s for s in JPEG_SCALES if s <= factor), 1)
    if scale == 1:
        return 1
    # Pillow derives its scale from the size asked for: this size gives exactly ``scale``.
    width, height = image.size
    return scale if image.draft(None, (width // scale, height // scale)) is not None else 1


def decode_image(data: bytes, name: str, max_pixels: int = 50_000_000,
                 reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode encoded image bytes (truncation is an error) into RGB; a JPEG at least twice
    ``reduce_to`` is decoded at a reduced scale (``draft_jpeg``), anything else at full size."""
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its two bomb limits; treat the warning as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(name, f"image too large (decompression bomb guard: {exc})") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not a supported image (allowed: JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is an image error
        raise ImageError(name, f"cannot decode image header ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(name, f"image too large ({width}x{height} > {max_pixels} pixels)")
    if width < 1 or height < 1:
        raise ImageError(name, f"image has no pixels ({width}x{height})")
    try:
        image.seek(0)  # first frame of animations
        draft_jpeg(image, reduce_to)  # after seek: a multi-picture JPEG resets it there
        image.load()  # decode now: truncated or corrupt data fails here, not later
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001
        raise ImageError(name, f"corrupt or truncated image data ({exc})") from None
    return to_rgb(image, name)


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency over ``ALPHA_BACKGROUND``.

    Wide and transparent modes are converted a band of rows at a time, so a huge image costs
    its own pixels plus the RGB result, never full-size float or RGBA temporaries.
    """
    try:
        if image.mode == "RGB":
            return image
        if image.mode in WIDE_GRAY_MODES:
            image = _wide_gray_to_l(image)
        if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
            return _composite_bands(image)
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise ImageError(name, f"cannot convert mode {image.mode} to RGB ({exc})") from None


def _bands(image: Image.Image) -> Iterator[tuple[int, Image.Image]]:
    """(top row, band) pieces of ``image`` of about ``BAND_PIXELS`` pixels each."""
    width, height = image.size
    rows = max(1, BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        yield top, image.crop((0, top, width, min(top + rows, height)))


def _wide_gray_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale -> 8-bit: the full range scaled down to 8 bits instead of clipped."""
    top = 65535.0 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 255.0
    out = np.empty((image.size[1], image.size[0]), dtype=np.uint8)
    for row, band in _bands(image):
        array = np.asarray(band, dtype=np.float64)  # one band: a few MB, whatever the image
        out[row:row + array.shape[0]] = np.clip(array / top * 255.0 + 0.5, 0, 255)
    return Image.fromarray(out)


def _composite_bands(image: Image.Image) -> Image.Image:
    """Transparent pixels over ``ALPHA_BACKGROUND``; per-pixel, so band by band is exact."""
    out = Image.new("RGB", image.size)
    for row, band in _bands(image):
        rgba = band.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        out.paste(Image.alpha_composite(background, rgba).convert("RGB"), (0, row))
    return out


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(name, "array must be HxW, HxWx1, HxWx3 or HxWx4")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
            array = array * 255.0  # float images in [0, 1]
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(array))


def to_pixels(image: Image.Image, config: Preprocessing) -> np.ndarray:
    """RGB PIL image -> float32 [3, H, W] exactly as the model was trained to see it."""
    if config.do_resize and image.size != (config.width, config.height):
        image = image.resize((config.width, config.height), RESAMPLE[config.resample])
    pixels = np.asarray(image, dtype=np.float64)
    if config.do_rescale:
        pixels = pixels * config.rescale_factor
    if config.do_normalize:
        pixels = (pixels - np.asarray(config.mean)) / np.asarray(config.std)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def preprocess_batch(images: list[Image.Image], config: Preprocessing) -> np.ndarray:
    """List of RGB images -> float32 [B, 3, H, W]."""
    return np.stack([to_pixels(image, config) for image in images])
