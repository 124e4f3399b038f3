"""Shared fixtures: tiny random-weight models exported once per test session, real JPEGs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import CONFIGS, FLICKR, build_model


@pytest.fixture(scope="session")
def flickr_images() -> list[Path]:
    images = sorted((FLICKR / "images").glob("*.jpg"))
    if not images:
        pytest.fail(f"Flickr8k images not found under {FLICKR}")
    return images[:6]


@pytest.fixture(scope="session")
def flickr_test_images() -> list[Path]:
    """The first images of Flickr8k's official test split, in the split file's order."""
    split = FLICKR / "split_test.txt"
    if not split.is_file():
        pytest.fail(f"Flickr8k test split not found: {split}")
    names = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    images = [FLICKR / "images" / name for name in names[:6]]
    missing = [image.name for image in images if not image.is_file()]
    if missing:
        pytest.fail(f"Flickr8k test images missing: {missing}")
    return images


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (Hugging Face model dir, edgecap export dir) for every tiny config."""
    pytest.importorskip("torch")
    from edgecap.export.onnx_export import export_pretrained

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
