"""Test helper: Debian's Chromium, headless, driven by Playwright, and local servers for it
to open (the Voilà app, JupyterLab). Modules that use it call :func:`require_browser`
first: it skips them, with the reason, where Chromium or Playwright is missing (``.ci/run``
installs Chromium; ``make`` installs the Python packages)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",  # as root (CI)
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-proxy-server",
]
STARTUP_SECONDS = 240  # a busy 2-core machine needs most of it: imports, kernel, notebook


def require_browser():
    """Playwright's sync API, or a module-level skip saying what is missing."""
    if CHROMIUM is None:
        pytest.skip(
            "Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)",
            allow_module_level=True,
        )
    return pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )


def launch(playwright, profile: Path, **options):
    """A persistent headless Chromium context (Debian's binary, no download)."""
    return playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_ARGS,
        **options,
    )


def record_foreign_requests(page, found: list[str]) -> None:
    """Append to ``found`` every URL ``page`` loads from anywhere but 127.0.0.1."""
    page.on(
        "requestfinished",
        lambda r: (
            None
            if urlparse(r.url).scheme in ("data", "blob") or urlparse(r.url).hostname == "127.0.0.1"
            else found.append(r.url)
        ),
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, what: str) -> None:
    """Wait until ``process`` (``what``, logging to ``log``) listens on ``port``."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{what} did not listen on port {port}:\n{log.read_text()}")
