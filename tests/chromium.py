"""Debian's Chromium, driven by Playwright, for the browser tests (the console, cross-origin)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

CHROMIUM = "/usr/bin/chromium"
# Quiet and headless in a container: no sandbox (no user namespaces), no GPU, no calls home.
ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update")

needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"
)


@asynccontextmanager
async def chromium(*extra_args: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*ARGS, *extra_args])
        try:
            yield browser
        finally:
            await browser.close()
