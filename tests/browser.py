"""A headless browser for the demo page tests: Debian's chromium driven by playwright (which
downloads no browser). Tests that use it skip when either is missing."""

from __future__ import annotations

import contextlib
import shutil
from typing import Iterator

import pytest


@contextlib.contextmanager
def headless_page(**page_options) -> Iterator:
    """A fresh page in headless chromium, closed on the way out."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("needs Debian's chromium for the headless browser check")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser.new_page(**page_options)
        finally:
            browser.close()


def wait_for_images(page, selector: str, timeout_s: float = 30.0) -> None:
    """Wait until every image matching ``selector`` has loaded. Polled from Python through
    CDP evaluation: the demo page's Content-Security-Policy forbids string eval, which
    ``page.wait_for_function`` with an expression needs."""
    import time

    images = page.locator(selector)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if images.evaluate_all("imgs => imgs.length > 0 && "
                               "imgs.every(img => img.complete && img.naturalWidth > 0)"):
            return
        time.sleep(0.1)
    raise AssertionError(f"images {selector!r} did not load within {timeout_s} s")
