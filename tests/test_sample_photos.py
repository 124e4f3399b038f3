"""The photos that ship in tests/data: licensed, small, real, and enough distinct ones for any test."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from conftest import PHOTO_DIR, shipped_photos


def test_every_shipped_photo_is_listed_with_a_free_licence():
    licences = (PHOTO_DIR / "LICENSES.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in licences.splitlines()
            if line.startswith("| `")}
    shipped = sorted(p.name for p in PHOTO_DIR.iterdir() if p.suffix.lower() in {".jpg", ".png"})
    assert sorted(rows) == shipped == sorted(p.name for p in shipped_photos())
    for name, row in rows.items():
        assert "CC0" in row or "Public domain" in row, name


def test_shipped_photos_are_small_rgb_jpegs():
    for path in shipped_photos():
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB", path.name
            assert max(image.size) <= 320 and path.stat().st_size < 64 * 1024, path.name


def test_sample_photos_returns_distinct_real_photos(sample_photos):
    paths = sample_photos(16)
    assert len(paths) == 16 and paths[:4] == [PHOTO_DIR / f"{n}.jpg" for n in
                                              ("cat", "coffee", "astronaut", "rocket")]
    digests = set()
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert min(pixels.shape[:2]) >= 64 and pixels.std() > 10, path.name  # a photo, not flat
        digests.add(hashlib.sha256(pixels.tobytes()).hexdigest())
    assert len(digests) == 16
    assert sample_photos(16) == paths  # same files when asked again in the session
