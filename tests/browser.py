"""Headless Chromium for the tests that look at a page, and where their screenshots go."""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ARTIFACTS = Path(
    os.environ.get("MOEKIT_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts")
)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (playwright driving the installed browser), ARTIFACTS created; the
    test is skipped, with the reason, when playwright or Chromium is missing."""
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed"
    )
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=browser_path,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        try:
            yield browser
        finally:
            browser.close()
