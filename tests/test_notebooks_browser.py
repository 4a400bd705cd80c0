"""The notebooks as a person runs them: JupyterLab in headless Chromium, Run All, defaults.

The test starts JupyterLab on a free 127.0.0.1 port (with a token) in a copy of the
project as a fresh clone has it (notebooks, the committed ``reports/isic`` study and its
study file), opens each notebook of :data:`NOTEBOOKS`, chooses *Run > Run All Cells* and
waits until every code cell has run. No cell may show an error or anything on stderr
(warnings included), and each notebook's key outputs must be on the page, within its time
budget. Screenshots are kept in the test's temporary folder. Skipped, with the reason,
where Chromium or Playwright is missing (see ``browser_helpers``).

Adding a notebook is one entry in :data:`NOTEBOOKS`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import browser_helpers as browser
import pytest
from kernel_helpers import ensure_kernel

sync_api = browser.require_browser()

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Expected:
    """What Run All on a notebook must show: ``texts`` somewhere in its outputs, at least
    ``images`` pictures, and every CSS selector of ``selectors``, within ``seconds``."""

    texts: tuple[str, ...] = ()
    images: int = 0
    selectors: tuple[str, ...] = ()
    seconds: int = 300


NOTEBOOKS = {
    "01_data": Expected(texts=("challenge", "paper"), images=2),
    "02_complexity": Expected(
        texts=("unet+ghpa+gab", "53374", "variants: 100%", "8/8 ["), images=1, seconds=480
    ),
    "03_train": Expected(texts=("quick recipe, egeunet", "best epoch", "pooled"), images=3),
    "04_report": Expected(
        texts=("study_dir: the newest study found: reports/isic", "Findings", "run_status"),
    ),
    "05_inference": Expected(
        texts=("checkpoint: the shipped weights 'isic2018'", "example_4.png"),
        images=1,
        selectors=(".egeunet-upload", ".egeunet-threshold"),
    ),
}
"""The notebooks the browser runs, and what each must show."""

SETTINGS = {
    # Run All must not save outputs into the copy mid-run, nor ask about news.
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}

KERNEL_READY = """() => /\\|\\s*Idle/.test(
    document.querySelector('#jp-main-statusbar')?.innerText || '')"""
"""The status bar reads "<kernel> | Idle": the kernel has started and connected (the
toolbar's indicator says idle before that)."""

ALL_RAN = """() => {
    const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
    if (!panel) return false;
    const cells = [...panel.querySelectorAll('.jp-CodeCell')];
    const prompts = cells.map(c => c.querySelector('.jp-InputPrompt')?.textContent || '');
    const busy = prompts.some(p => p.includes('*'));
    const failed = panel.querySelector('[data-mime-type="application/vnd.jupyter.stderr"]');
    return !busy && (failed !== null || prompts.every(p => /\\[\\d+\\]/.test(p)));
}"""


def fresh_clone(folder: Path) -> Path:
    """What a clone gives JupyterLab: the notebooks, the committed isic study (run folders
    with checkpoints, its report and study file), pyproject.toml and jupytext.toml."""
    project = folder / "project"
    (project / "notebooks").mkdir(parents=True)
    for name in ("pyproject.toml", "jupytext.toml"):
        shutil.copy2(REPO / name, project / name)
    for path in (REPO / "notebooks").glob("*.ipynb"):
        shutil.copy2(path, project / "notebooks" / path.name)
    shutil.copytree(REPO / "reports" / "isic", project / "reports" / "isic")
    (project / "studies").mkdir()
    shutil.copy2(REPO / "studies" / "isic.yaml", project / "studies" / "isic.yaml")
    return project


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """JupyterLab serving a fresh clone; yields (address with token, project folder)."""
    ensure_kernel()
    if not (REPO / "reports" / "isic" / "runs").is_dir():
        pytest.skip("reports/isic (the committed study) is not in this checkout")
    folder = tmp_path_factory.mktemp("jupyterlab")
    project = fresh_clone(folder)
    for plugin, values in SETTINGS.items():
        path = folder / "settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = browser.free_port(), secrets.token_hex(16)
    environment = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(folder / "config"),
        "JUPYTER_RUNTIME_DIR": str(folder / "runtime"),
        "EGEUNET_CACHE": str(folder / "cache"),
    }
    log = folder / "jupyterlab.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={project}",
             f"--LabApp.user_settings_dir={folder / 'settings'}",
             f"--LabApp.workspaces_dir={folder / 'workspaces'}",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,  # its own group: the kernels it starts end with it
        )  # fmt: skip
    try:
        browser.wait_for_port(port, process, log, "jupyter lab")
        yield f"http://127.0.0.1:{port}", token, project
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """End JupyterLab and its kernels: Ctrl+C twice (it asks first), then SIGKILL."""
    for _ in range(2):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            time.sleep(0.5)
    if process.poll() is None:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def shut_down_kernels(address: str, token: str) -> None:
    """End every kernel the server runs (a notebook's kernel outlives its page)."""
    headers = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(
        urllib.request.Request(f"{address}/api/kernels", headers=headers)
    ) as r:
        kernels = json.load(r)
    for kernel in kernels:
        request = urllib.request.Request(
            f"{address}/api/kernels/{kernel['id']}", headers=headers, method="DELETE"
        )
        urllib.request.urlopen(request).close()


def run_all(page, name: str, expected: Expected, screenshot: Path) -> str:
    """Open ``name``, Run All, wait until every code cell ran; the outputs' text."""
    page.locator(".jp-NotebookPanel .jp-Notebook .jp-CodeCell").first.wait_for(
        timeout=browser.STARTUP_SECONDS * 1000
    )
    page.wait_for_function(KERNEL_READY, timeout=browser.STARTUP_SECONDS * 1000, polling=500)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    started = time.monotonic()
    try:
        page.wait_for_function(ALL_RAN, timeout=expected.seconds * 1000, polling=1000)
    finally:
        page.screenshot(path=str(screenshot), full_page=True)
    print(f"{name}: Run All took {time.monotonic() - started:.0f} s")
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea").all_inner_texts()


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_run_all_in_jupyterlab(jupyterlab, name, tmp_path):
    address, token, _ = jupyterlab
    expected = NOTEBOOKS[name]
    elsewhere: list[str] = []
    with sync_api.sync_playwright() as playwright:
        context = browser.launch(
            playwright, tmp_path / "chromium-profile", viewport={"width": 1400, "height": 1000}
        )
        try:
            page = context.new_page()
            browser.record_foreign_requests(page, elsewhere)
            page.set_default_timeout(60_000)
            page.goto(  # a workspace of its own: no other notebook restored beside it
                f"{address}/lab/workspaces/{name}/tree/notebooks/{name}.ipynb?token={token}",
                timeout=browser.STARTUP_SECONDS * 1000,
            )
            outputs = run_all(page, name, expected, tmp_path / f"{name}.png")
            panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
            stderr = panel.locator("[data-mime-type='application/vnd.jupyter.stderr']")
            problems = stderr.all_inner_texts()
            images = panel.locator(".jp-OutputArea-output img").count()
            shown = {s: panel.locator(s).count() for s in expected.selectors}
        finally:
            context.close()
            shut_down_kernels(address, token)
    assert problems == [], f"{name}: errors or warnings on the page:\n" + "\n".join(problems)
    text = " ".join(" ".join(outputs).split())  # widgets space with &nbsp; and the like
    missing = [t for t in expected.texts if " ".join(t.split()) not in text]
    assert missing == [], f"{name}: outputs lack {missing}:\n{text[:3000]}"
    assert images >= expected.images, f"{name}: {images} picture(s), expected {expected.images}"
    assert all(shown.values()), f"{name}: widgets missing: {shown}"
    assert elsewhere == [], f"JupyterLab loaded files from elsewhere: {elsewhere}"
