"""Headless Chromium (Debian's ``chromium``) for report tests and benchmarks.

Driven with Playwright for Python (the ``dev`` extra): it launches the system chromium
(``executable_path``; no ``playwright install``), collects console messages, page errors and
requests, waits until every figure rendered and lets tests hover and query elements.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def playwright_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("playwright") is not None


@dataclass
class Session:
    """An open report page and everything the browser said while loading it."""

    page: object
    console: list[str] = field(default_factory=list)  # "type: text"
    errors: list[str] = field(default_factory=list)  # uncaught exceptions
    requests: list[str] = field(default_factory=list)  # every URL the page asked for


@contextlib.contextmanager
def open_page(html_file: Path, width: int = 1280, height: int = 1000, timeout_ms: int = 60000) -> Iterator[Session]:
    """Open ``html_file`` in headless chromium and wait until the report's figures rendered
    (``data-rendered-ms`` on <body>)."""
    from playwright.sync_api import sync_playwright

    flags = [f for f in FLAGS if f != "--headless"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=flags)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            session = Session(page)
            page.on("console", lambda m: session.console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: session.errors.append(str(e)))
            page.on("request", lambda r: session.requests.append(r.url))
            page.goto(Path(html_file).resolve().as_uri())
            page.wait_for_selector("body[data-rendered-ms]", state="attached", timeout=timeout_ms)
            yield session
        finally:
            browser.close()
