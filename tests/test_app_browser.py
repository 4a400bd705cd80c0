"""``egeunet app`` in a real browser: Debian's Chromium, headless, driven by Playwright.

The test starts the app on a free 127.0.0.1 port with a checkpoint trained in the test,
uploads a file that is not an image (the page says so) and then a lesion image (a real
ISIC image from the shared data, a generated one where that is absent), waits for the
overlay, moves the threshold with the keyboard, downloads the mask and the areas CSV and
checks them against ``egeunet predict`` on the same file. A screenshot is saved in the
test's temporary folder. Skipped, with the reason, where Chromium, Playwright or Voilà is
missing (``.ci/run`` installs Chromium; ``make`` installs the Python packages).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
from engine_helpers import train_small_checkpoint
from kernel_helpers import ensure_kernel
from PIL import Image

from egeunet.cli import main as cli_main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)
pytest.importorskip("voila", reason="voila is not installed (pip install -e .)")

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
THRESHOLD_STEPS = -20  # arrow presses on the slider handle: 0.50 -> 0.30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"egeunet app exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"egeunet app did not listen on port {port}:\n{log.read_text()}")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory, synthetic_cache):
    """``egeunet app`` serving a checkpoint trained here; yields (address, checkpoint)."""
    ensure_kernel()
    folder = tmp_path_factory.mktemp("app_server")
    checkpoint = train_small_checkpoint(folder / "run")
    port = free_port()
    log = folder / "app.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "egeunet.cli", "app", "--weights", str(checkpoint),
             "--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the kernels it starts end with it
        )  # fmt: skip
    try:
        wait_for_port(port, process, log)
        assert f"open http://127.0.0.1:{port}/ in a browser" in log.read_text()
        yield f"http://127.0.0.1:{port}/", checkpoint
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Voilà shuts its kernels down on Ctrl+C
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def upload(page, path: Path) -> None:
    """Choose ``path`` in the upload button's file dialog."""
    with page.expect_file_chooser() as chooser:
        page.locator(".egeunet-upload").click()
    chooser.value.set_files(str(path))


def lesion_pixels(area_text: str) -> int:
    return int(re.search(r"lesion ([\d,]+) of", area_text).group(1).replace(",", ""))


def test_segment_an_image_in_the_browser(app_server, lesion_images, tmp_path):
    url, checkpoint = app_server
    image = lesion_images[0]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not a picture")
    elsewhere = []
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            accept_downloads=True,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            page = context.new_page()
            page.on(
                "requestfinished",
                lambda r: (
                    None
                    if urlparse(r.url).scheme in ("data", "blob")
                    or urlparse(r.url).hostname == "127.0.0.1"
                    else elsewhere.append(r.url)
                ),
            )
            page.set_default_timeout(60_000)
            page.goto(url, timeout=STARTUP_SECONDS * 1000)
            page.locator(".egeunet-upload").wait_for(timeout=STARTUP_SECONDS * 1000)

            upload(page, not_an_image)  # the page says why, and keeps working
            page.locator(".egeunet-messages", has_text="cannot read image notes.png").wait_for()

            upload(page, image)
            page.locator("img.egeunet-overlay[src]").wait_for()
            page.locator("img.egeunet-mask[src]").wait_for()
            area = page.locator(".egeunet-area")
            area.filter(has_text=f"{image.name} at threshold 0.50").wait_for()
            before = lesion_pixels(area.inner_text())

            handle = page.locator(".egeunet-threshold .noUi-handle")
            handle.focus()
            for _ in range(abs(THRESHOLD_STEPS)):
                handle.press("ArrowLeft" if THRESHOLD_STEPS < 0 else "ArrowRight")
            area.filter(has_text="at threshold 0.30").wait_for()
            after = lesion_pixels(area.inner_text())

            with page.expect_download() as mask_download:
                page.locator("a.egeunet-download-mask").click()
            assert mask_download.value.suggested_filename == f"{image.stem}_mask.png"
            mask_download.value.save_as(tmp_path / "downloaded_mask.png")
            with page.expect_download() as csv_download:
                page.locator("a.egeunet-download-csv").click()
            csv_download.value.save_as(tmp_path / "lesion_areas.csv")
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        finally:
            context.close()

    assert cli_main(["predict", "--checkpoint", str(checkpoint), "--input", str(image),
                     "--output", str(tmp_path / "predicted"), "--threshold", "0.3"]) == 0  # fmt: skip
    expected = Image.open(tmp_path / "predicted" / f"{image.stem}_mask.png")
    downloaded = Image.open(tmp_path / "downloaded_mask.png")
    assert downloaded.size == expected.size == Image.open(image).size
    np.testing.assert_array_equal(np.asarray(downloaded), np.asarray(expected))
    pixels = int((np.asarray(downloaded) > 0).sum())
    assert after == pixels and before != after and 0 < pixels < downloaded.width * downloaded.height
    areas = pd.read_csv(tmp_path / "lesion_areas.csv")
    assert list(areas["image"]) == [image.name] and areas["lesion_pixels"].iloc[0] == pixels
    assert areas["threshold"].iloc[0] == pytest.approx(0.3)
    assert Image.open(tmp_path / "app.png").size[0] == 1280
    assert elsewhere == [], f"the page loaded files from elsewhere: {elsewhere}"
