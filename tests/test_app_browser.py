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
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser_helpers import (
    STARTUP_SECONDS,
    free_port,
    launch,
    record_foreign_requests,
    require_browser,
    wait_for_port,
)
from engine_helpers import train_small_checkpoint
from kernel_helpers import ensure_kernel
from PIL import Image

from egeunet.cli import main as cli_main

sync_api = require_browser()
pytest.importorskip("voila", reason="voila is not installed (pip install -e .)")

THRESHOLD_STEPS = -20  # arrow presses on the slider handle: 0.50 -> 0.30


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
        wait_for_port(port, process, log, "egeunet app")
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
        context = launch(
            playwright,
            tmp_path / "chromium-profile",
            accept_downloads=True,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            page = context.new_page()
            record_foreign_requests(page, elsewhere)
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
