"""Headless Chromium (Debian's ``chromium``) for report tests and benchmarks."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(html_file: Path, screenshot: Path | None = None, budget_ms: int = 10000) -> tuple[str, str]:
    """(DOM after scripts ran, browser log with console messages)."""
    exe = chromium()
    with tempfile.TemporaryDirectory() as prof:
        res = subprocess.run([exe, *FLAGS, f"--user-data-dir={prof}", "--enable-logging=stderr", "--v=0",
                              f"--virtual-time-budget={budget_ms}", "--dump-dom", html_file.resolve().as_uri()],
                             capture_output=True, text=True, timeout=120)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as prof:
            subprocess.run([exe, *FLAGS, f"--user-data-dir={prof}", "--window-size=1200,3000", f"--virtual-time-budget={budget_ms}",
                            f"--screenshot={screenshot.resolve()}", html_file.resolve().as_uri()], capture_output=True, timeout=120)
    return res.stdout, res.stderr
