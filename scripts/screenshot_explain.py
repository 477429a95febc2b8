"""Render the explain page for "my name is aj" and screenshot it for the README (docs/explain.png).

Uses Debian's Chromium (/usr/bin/chromium) through Playwright's Python package, never a browser
that a tool downloads.

    .venv/bin/python scripts/screenshot_explain.py [--model minilm] [--output docs/explain.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

import ctxvec
from ctxvec.explain import explain

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default="my name is aj")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "explain.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        page_path = Path(tmp) / "explain.html"
        explain(ctxvec.load(args.model), args.text, page_path)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(page_path.resolve().as_uri())
            page.wait_for_selector('body[data-ready="1"]')
            # step 5, from its title to the grid of heads: the real attention of this sentence
            section = page.locator("#step-attention").bounding_box()
            grid = page.locator("#heads-grid").bounding_box()
            args.output.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.output), full_page=True, clip={
                "x": section["x"] - 12, "y": section["y"] - 12, "width": section["width"] + 24,
                "height": grid["y"] + grid["height"] + 24 - section["y"]})
            browser.close()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
