"""Decode memory: 16-bit, palette and transparent images convert band by band (exactly as the
whole-image conversion did), and a real server's peak RSS, read from /proc, stays within the
bound docs/deploy.md documents when small PNGs decode to tens of megapixels."""

from __future__ import annotations

import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecap import preprocess
from edgecap.decode_guard import BudgetExceeded, check_request_pixels, header_pixels
from edgecap.preprocess import ALPHA_BACKGROUND, decode_image, to_rgb
from image_bombs import png_bomb

pytest.importorskip("starlette")
from test_server import Server, multipart, request  # noqa: E402

# docs/deploy.md: what one request (and, through the decode gate, the server) may add to its
# peak RSS while decoding, measured on a fresh server (the first bomb finds no freed memory).
PEAK_BOUND_MB = 600
BOMB_SIDE = 7000  # 49 megapixels: just under the per-image limit, so only the new bounds stop it


def reference_rgb(image: Image.Image) -> Image.Image:
    """The whole-image conversion that to_rgb replaced (float64 copies of every pixel)."""
    if image.mode.startswith("I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    gray16 = Image.fromarray(rng.integers(0, 65536, (37, 53), dtype=np.uint16))
    gray32 = Image.fromarray(rng.integers(0, 70000, (37, 53), dtype=np.int32))
    dim32 = Image.fromarray(rng.integers(0, 200, (37, 53), dtype=np.int32))
    rgba = Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8))
    palette = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = bytes(rng.integers(0, 256, 256, dtype=np.uint8))
    return [gray16, gray32, dim32, rgba, rgba.convert("LA"), palette,
            rgba.convert("RGB").convert("CMYK")]


def test_band_conversion_equals_the_whole_image_one(monkeypatch):
    monkeypatch.setattr(preprocess, "BAND_PIXELS", 200)  # many bands, the last one short
    for image in odd_images():
        got, want = to_rgb(image), reference_rgb(image)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want)), image.mode


def test_request_pixel_budget_reads_headers_only():
    bomb = png_bomb(BOMB_SIDE, BOMB_SIDE)
    assert header_pixels(bomb) == BOMB_SIDE**2 and header_pixels(b"not an image") == 0
    assert check_request_pixels([("a", bomb), ("b", b"junk")], BOMB_SIDE**2) == [BOMB_SIDE**2, 0]
    with pytest.raises(BudgetExceeded, match="at most") as caught:
        check_request_pixels([("a.png", bomb), ("b.png", bomb)], BOMB_SIDE**2)
    assert caught.value.source == "a.png, b.png"


def test_16_bit_bomb_decodes_to_8_bit_rgb():
    image = decode_image(png_bomb(1000, 800), "bomb")
    assert image.mode == "RGB" and image.size == (1000, 800)
    assert decode_image(png_bomb(300, 200, bit_depth=8, color_type=3), "p").getpixel((0, 0)) \
        == ALPHA_BACKGROUND  # palette index 0 is fully transparent


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def added_peak_mb(pid: int, send) -> tuple[float, object]:
    """Peak RSS that ``send()`` adds to process ``pid``: the kernel's high-water mark (VmHWM),
    reset first through clear_refs, less the RSS before."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = proc_kb(pid, "VmRSS")
    result = send()
    return (proc_kb(pid, "VmHWM") - before) / 1024, result


@pytest.fixture(scope="module")
def bomb_server(tiny_export):
    srv = Server(tiny_export, "--max-body-mb", "4", "--timeout-s", "60")
    yield srv
    assert srv.stop() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bombs_stay_within_the_peak_bound(bomb_server):
    bomb = png_bomb(BOMB_SIDE, BOMB_SIDE)  # about 95 kB
    url = bomb_server.url + "/v1/captions"
    pid = bomb_server.proc.pid
    body, headers = multipart([(f"b{i}.png", bomb) for i in range(4)], {})
    peak, (status, answer, _) = added_peak_mb(pid, lambda: request(url, body, headers))
    assert status == 413 and answer["error"] == "too_many_pixels", answer
    assert peak < 50, peak  # refused from the headers: nothing was decoded

    peak, (status, answer, _) = added_peak_mb(pid, lambda: request(url, bomb))
    assert status == 200 and "generated_text" in answer, answer
    assert peak < PEAK_BOUND_MB, peak

    def two_at_once():
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(lambda _: request(url, bomb)[0], range(2)))

    peak, statuses = added_peak_mb(pid, two_at_once)
    assert statuses == [200, 200]
    assert peak < PEAK_BOUND_MB, peak  # the decode gate: one bomb decodes at a time


def test_request_budget_counts_every_image(bomb_server):
    small = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(small, "PNG")
    body, headers = multipart([("small.png", small.getvalue()),
                               ("bomb.png", png_bomb(BOMB_SIDE, BOMB_SIDE))] * 3, {})
    status, answer, _ = request(bomb_server.url + "/v1/captions", body, headers)
    assert status == 413 and "small.png, bomb.png" in answer["detail"], answer
    body, headers = multipart([("small.png", small.getvalue())] * 3, {})
    status, answer, _ = request(bomb_server.url + "/v1/captions", body, headers)
    assert status == 200 and len(answer["results"]) == 3, answer
