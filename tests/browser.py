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
