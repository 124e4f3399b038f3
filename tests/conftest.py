"""Shared fixtures: tiny random-weight models exported once per test session, real photos.

Every photo a test reads ships in tests/data (public domain / CC0, see tests/data/LICENSES.md),
so the suite passes in any clone. Only tests that need Flickr8k's scale (thousands of images,
human reference captions) read ../shared/data/flickr8k, and they skip when it is absent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from tiny_models import CONFIGS, FLICKR, GPT2_TOKENIZER_JSON, build_model

PHOTO_DIR = Path(__file__).resolve().parent / "data"
# Colour photos first, so a test that takes a few gets varied, colourful scenes.
PHOTO_NAMES = ["cat", "coffee", "astronaut", "rocket", "hubble", "retina", "camera", "clock",
               "brick", "grass", "gravel"]
# One caption per shipped photo, for the Flickr8k-format mini dataset the training tests use.
PHOTO_CAPTIONS = {
    "cat": "a tabby cat looks at the camera",
    "coffee": "a cup of coffee on a red saucer on a wooden table",
    "astronaut": "an astronaut in an orange suit smiles in front of a flag",
    "rocket": "a rocket stands on a launch pad at night",
    "hubble": "many small galaxies in the dark sky",
    "retina": "a photograph of the back of a human eye",
    "camera": "a man with a camera on a tripod in a field",
    "clock": "a blurred clock on a wall",
    "brick": "a wall of grey bricks",
    "grass": "a close view of green grass",
    "gravel": "a close view of grey gravel stones",
}

# Five references per image, like Flickr8k.
CAPTION_LEADS = ["", "there is ", "a photo of ", "here is ", "the picture shows "]

HAS_FLICKR = (FLICKR / "captions.txt").is_file() and (FLICKR / "images").is_dir()
# For tests that need Flickr8k's scale; everything else uses the photos in tests/data.
needs_flickr = pytest.mark.skipif(
    not HAS_FLICKR, reason=f"needs the Flickr8k research data at {FLICKR} (absent in this checkout)")


def shipped_photos() -> list[Path]:
    """The real photos in tests/data, in PHOTO_NAMES order."""
    return [PHOTO_DIR / f"{name}.jpg" for name in PHOTO_NAMES]


# Derived variants of a shipped photo: each is a different image (mirror, flips, rotations,
# crops), still a real photo's content and statistics.
VARIANTS: list[Callable[[Image.Image], Image.Image]] = [
    ImageOps.mirror,
    ImageOps.flip,
    lambda im: im.rotate(90, expand=True),
    lambda im: im.rotate(270, expand=True),
    lambda im: im.crop((0, 0, im.width * 3 // 4, im.height * 3 // 4)),
    lambda im: im.crop((im.width // 4, im.height // 4, im.width, im.height)),
    lambda im: im.crop((im.width // 8, im.height // 8, im.width * 7 // 8, im.height * 7 // 8)),
    lambda im: ImageOps.mirror(im.rotate(90, expand=True)),
]


def derive_photos(n: int, out_dir: Path) -> list[Path]:
    """n distinct photo paths: the shipped ones first, then variants written to out_dir."""
    photos = shipped_photos()
    limit = len(photos) * (1 + len(VARIANTS))
    if not 0 <= n <= limit:
        raise ValueError(f"sample_photos: n must be in 0..{limit}, got {n}")
    paths = []
    for i in range(n):
        variant, source = divmod(i, len(photos))
        if variant == 0:
            paths.append(photos[source])
            continue
        path = out_dir / f"{photos[source].stem}-v{variant}.jpg"
        if not path.exists():
            image = VARIANTS[variant - 1](Image.open(photos[source]).convert("RGB"))
            image.save(path, "JPEG", quality=85)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def sample_photos(tmp_path_factory) -> Callable[[int], list[Path]]:
    """sample_photos(n) -> n distinct real photo paths (tests/data, then derived variants)."""
    out_dir = tmp_path_factory.mktemp("derived-photos")
    return lambda n: derive_photos(n, out_dir)


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """Six shipped real photos (cat, coffee, astronaut, rocket, hubble, retina)."""
    return shipped_photos()[:6]


# The names below predate tests/data (they were Flickr8k images); they now return the shipped
# photos, so the tests that use them pass in any clone.
@pytest.fixture(scope="session")
def flickr_images(photos) -> list[Path]:
    return photos


@pytest.fixture(scope="session")
def flickr_test_images(photos) -> list[Path]:
    return photos


def write_gpt2_bpe_files(out_dir: Path) -> Path:
    """encoder.json + vocab.bpe (the files the training recipe reads) from the shipped tokenizer."""
    model = json.loads(GPT2_TOKENIZER_JSON.read_text())["model"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "encoder.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir


@pytest.fixture(scope="session")
def mini_flickr(tmp_path_factory, sample_photos) -> Path:
    """A Flickr8k-format folder (images/, captions.txt, split_*.txt, ../gpt2-bpe) built from the
    shipped photos: 12 train, 4 dev, 4 test images, so training runs in any clone."""
    root = tmp_path_factory.mktemp("mini-flickr")
    data = root / "flickr8k"
    (data / "images").mkdir(parents=True)
    lines, names = [], []
    for path in sample_photos(20):
        name = path.name
        (data / "images" / name).write_bytes(path.read_bytes())
        caption = PHOTO_CAPTIONS[path.stem.split("-v")[0]]
        lines += [f"{name}#{k}\t{lead}{caption} ." for k, lead in enumerate(CAPTION_LEADS)]
        names.append(name)
    (data / "captions.txt").write_text("\n".join(lines) + "\n")
    for split, part in (("train", names[:12]), ("dev", names[12:16]), ("test", names[16:])):
        (data / f"split_{split}.txt").write_text("\n".join(part) + "\n")
    write_gpt2_bpe_files(root / "gpt2-bpe")
    return data


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (Hugging Face model dir, edgecap export dir) for every tiny config."""
    pytest.importorskip("torch")
    from edgecap.export.graphs.onnx_export import export_pretrained

    exports = {}
    root = tmp_path_factory.mktemp("tiny")
    for cfg in CONFIGS:
        hf_dir = build_model(cfg, root / cfg.name / "hf")
        export_pretrained(hf_dir, root / cfg.name / "onnx")
        exports[cfg.name] = (hf_dir, root / cfg.name / "onnx")
    return exports


@pytest.fixture(scope="session")
def tiny_export(tiny_exports) -> Path:
    return tiny_exports[CONFIGS[0].name][1]
