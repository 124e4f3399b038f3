"""Open the `edgecap serve` demo page in headless Chromium, upload an image, and save a screenshot
once the caption shows. Needs Debian's chromium and `pip install playwright` (no browser
download: it drives /usr/bin/chromium).

    python -m benchmarks.demo_screenshot [--model DIR] [--image IMG] [--out demo.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .local_server import running_server

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--image", type=Path, default=FLICKR / "images" / "1000268201_693b08cb0e.jpg")
    parser.add_argument("--out", type=Path, default=Path("demo.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    with running_server(args.model) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 900, "height": 800})
        page.goto(base + "/")
        page.set_input_files("#file", str(args.image))
        page.wait_for_function(
            "document.getElementById('caption').textContent.length > 0 && "
            "document.getElementById('caption').textContent !== 'captioning...'", timeout=60000)
        caption = page.inner_text("#caption")
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    print(f"caption shown: {caption!r}; screenshot: {args.out}")
    return 0 if caption and not caption.startswith("error") else 1


if __name__ == "__main__":
    sys.exit(main())
