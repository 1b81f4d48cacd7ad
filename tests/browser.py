"""A real headless browser for the tests that look at what a person sees: Debian's Chromium (`make browser`
installs it) driven by Playwright, with the flags a closed network and a locked-down machine need.

`open_page()` yields a page and the list of console errors and uncaught exceptions it collects; the tests
skip, naming the missing browser, only where no Chromium is installed (`make test` installs it first).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = os.environ.get("CTVLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",  # the tests may run as root
    "--disable-gpu",
    "--use-angle=swiftshader",  # WebGL 2 on the CPU (NiiVue draws with it)
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",  # no calls home on a closed network
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_or_skip() -> str:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: `make browser` installs Debian's chromium (make test does)")
    return CHROMIUM


@contextmanager
def open_page(width: int = 1280, height: int = 900) -> Iterator[tuple[object, list[str]]]:
    """A fresh browser page and the console errors it logs ("error" messages and page exceptions)."""
    from playwright.sync_api import sync_playwright

    executable = chromium_or_skip()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
            yield page, errors
        finally:
            browser.close()


def screenshot(element, path: Path) -> np.ndarray:
    """The element as an RGB array (and saved as PNG at `path` for a person to look at)."""
    from PIL import Image

    element.screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("RGB")).astype(int)
