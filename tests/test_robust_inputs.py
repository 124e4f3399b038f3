"""A generated corpus of bad and unusual inputs: every one gets exactly one output line, a
caption or a clear reason, and a killed batch run resumes without losing or duplicating lines."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecap.cli.main import main
from edgecap.preprocess import load_image


def png_with_declared_size(width: int, height: int) -> bytes:
    """A valid PNG signature and header that declares a huge image, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def build_corpus(root: Path, jpeg: Path) -> dict[str, str]:
    """Write the corpus; returns name -> 'ok' (must caption) or 'error' (must be rejected)."""
    rng = random.Random(0)
    expect: dict[str, str] = {}
    good = jpeg.read_bytes()
    photo = Image.open(jpeg).convert("RGB")
    png = encode(photo, "PNG")

    def put(name: str, data: bytes, outcome: str) -> None:
        (root / name).write_bytes(data)
        expect[name] = outcome

    put("zero-bytes.jpg", b"", "error")
    for i in range(15):
        put(f"random-{i:02d}.jpg", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4000))), "error")
    for i, cut in enumerate(sorted(rng.sample(range(20, len(good) - 200), 25))):
        put(f"truncated-jpeg-{i:02d}.jpg", good[:cut], "error")
    for i, cut in enumerate(sorted(rng.sample(range(60, len(png) - 100), 20))):
        put(f"truncated-png-{i:02d}.png", png[:cut], "error")
    for i in range(25):  # bit flips: may still decode (then it must caption) or fail cleanly
        data = bytearray(good)
        for _ in range(rng.randrange(1, 20)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        put(f"bitflip-{i:02d}.jpg", bytes(data), "any")
    put("huge-declared.png", png_with_declared_size(100_000, 100_000), "error")
    put("huge-declared-wide.png", png_with_declared_size(2_000_000, 1_000), "error")
    put("one-pixel.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "ok")
    put("very-wide.png", encode(Image.new("RGB", (20000, 10), (10, 200, 10)), "PNG"), "ok")
    put("cmyk.jpg", encode(photo.convert("CMYK"), "JPEG"), "ok")
    put("gray16.png", encode(Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)), "PNG"), "ok")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    put("palette-transparent.png", encode(palette, "PNG", transparency=0), "ok")
    put("la.png", encode(photo.convert("LA"), "PNG"), "ok")
    put("rgba.webp", encode(photo.convert("RGBA"), "WEBP"), "ok")
    put("gray.bmp", encode(photo.convert("L"), "BMP"), "ok")
    put("photo.tiff", encode(photo, "TIFF"), "ok")
    frames = [photo, photo.rotate(90), photo.rotate(180)]
    put("animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), "ok")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    put("exif-rotated.jpg", encode(photo.resize((64, 32)), "JPEG", exif=exif), "ok")
    put("text-renamed.jpg", b"hello, I am a text file pretending to be a JPEG\n" * 20, "error")
    put("html.png", b"<html><body>not an image</body></html>", "error")
    put("svg.jpg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "error")
    put("pdf.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "error")
    put("ico.png", encode(photo.resize((32, 32)), "ICO"), "error")  # decoder not allowed
    put("good.jpg", good, "ok")
    (root / "folder.jpg").mkdir()
    expect["folder.jpg"] = "error"
    if os.geteuid() != 0:  # root reads anything; the check only means something for users
        put("unreadable.jpg", good, "error")
        os.chmod(root / "unreadable.jpg", 0)
    return expect


def test_exif_orientation_is_applied(tmp_path, flickr_images):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.open(flickr_images[0]).convert("RGB").resize((64, 32)).save(path, exif=exif)
    assert load_image(path).size == (32, 64)


def test_alpha_is_composited_on_white():
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(clear).getpixel((0, 0)) == (255, 255, 255)


def test_corpus_every_input_gets_one_clear_line(tiny_export, flickr_images, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    expect = build_corpus(corpus, flickr_images[0])
    assert len(expect) >= 100
    inputs = [str(corpus / name) for name in sorted(expect)]
    out = tmp_path / "results.jsonl"
    code = main(["caption", *inputs, "--model", str(tiny_export), "--out", str(out),
                 "--batch-size", "4"])
    assert code == 1  # some inputs failed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in records] == inputs  # one line each, in input order
    for record in records:
        wanted = expect[Path(record["source"]).name]
        if wanted != "any":
            assert record["status"] == wanted, record
        if record["status"] == "error":
            assert record["error"] and "Traceback" not in record["error"]
        else:
            assert record["generated_text"]
    reasons = {Path(r["source"]).name: r.get("error", "") for r in records}
    assert "too large" in reasons["huge-declared.png"]
    assert "directory" in reasons["folder.jpg"]
    assert "empty" in reasons["zero-bytes.jpg"]
    assert "truncated" in reasons["truncated-jpeg-10.jpg"]
    print(f"{sum(r['status'] == 'ok' for r in records)} ok, "
          f"{sum(r['status'] == 'error' for r in records)} errors out of {len(records)}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_batch_run_resumes_without_loss_or_duplicates(tiny_export, flickr_images, tmp_path, sig):
    folder = tmp_path / "images"
    folder.mkdir()
    # Enough images that the signal lands mid-run even when a tiny-model caption takes ~2 ms.
    count = 80
    for i in range(count):
        (folder / f"img{i:03d}.jpg").write_bytes(flickr_images[i % len(flickr_images)].read_bytes())
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "edgecap.cli", "caption", str(folder), "--model",
               str(tiny_export), "--out", str(out), "--batch-size", "1", "--beams", "4"]
    # A shell starts background jobs with SIGINT ignored and children inherit that; give the run
    # the default disposition, as an interactive Ctrl-C would find it.
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    partial = out.read_text().count("\n")
    assert 5 <= partial < count, f"kill landed outside the run ({partial} lines)"
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "already in" in rerun.stderr
    sources = [json.loads(line)["source"] for line in out.read_text().splitlines()]
    assert sorted(sources) == sorted(str(p) for p in folder.iterdir())
    assert len(sources) == len(set(sources)) == count
