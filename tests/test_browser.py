"""A real browser runs chapter 00 in JupyterLab: no error outputs, and a widget responds.

Headless Debian chromium driven by Playwright; JupyterLab on loopback with a token, serving a
*copy* of the notebook (so autosave never writes outputs into the repository).
"""
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from labkit.servers import free_port

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAB_CONFIG = REPO / "jupyter-config"        # JupyterLab defaults `make lab` and Binder install
BROWSER_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def jupyter_lab(tmp_path):
    if not Path(CHROMIUM).exists():
        message = "chromium is missing: `make setup` installs it as root on Debian/Ubuntu (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)       # CI must really run the browser test
        pytest.skip(message)
    shutil.copy(REPO / "notebooks" / "00_setup.ipynb", tmp_path / "00_setup.ipynb")
    port, token = free_port(), secrets.token_hex(16)
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
         "--LabApp.expose_app_in_browser=True"] + (["--allow-root"] if os.geteuid() == 0 else []),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "JUPYTER_CONFIG_PATH": str(LAB_CONFIG)})     # the lab's defaults, as `make lab` sets them
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-2000:])
    yield base, token
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


@pytest.mark.full     # a third executor (a real browser) for chapter 00: make test-full
@pytest.mark.engine
def test_chapter_00_runs_in_jupyterlab(jupyter_lab):
    from playwright.sync_api import sync_playwright
    base, token = jupyter_lab
    shot = REPO / "build" / "browser-00_setup.png"
    shot.parent.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{base}/lab/tree/00_setup.ipynb?token={token}")
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                               " && window.jupyterapp.shell.currentWidget.sessionContext"
                               " && window.jupyterapp.shell.currentWidget.sessionContext.session", timeout=60_000)
        page.wait_for_function("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                               " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                               timeout=60_000)
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        # done when every code cell has an execution count and the kernel is idle again
        page.wait_for_function("""() => {
            const nb = window.jupyterapp.shell.currentWidget;
            const cells = nb.content.widgets.filter(c => c.model.type === 'code');
            return nb.sessionContext.session.kernel.status === 'idle'
                && cells.every(c => c.model.executionCount !== null);
        }""", timeout=240_000, polling=1000)
        errors = page.evaluate("""() => window.jupyterapp.shell.currentWidget.content.widgets
            .filter(c => c.model.type === 'code')
            .flatMap(c => c.model.outputs.toJSON())
            .filter(o => o.output_type === 'error')
            .map(o => o.ename + ': ' + o.evalue)""")
        assert errors == [], errors
        result = page.locator(".labkit-memcalc-result").first
        result.wait_for(timeout=30_000)
        result.scroll_into_view_if_needed()      # JupyterLab renders only cells near the viewport
        page.wait_for_function("() => document.querySelector('.labkit-memcalc-result').innerText.includes('GiB')",
                               timeout=30_000)
        before = result.inner_text()
        slider = page.locator(".widget-slider .ui-slider-handle, .widget-slider .noUi-handle").first
        slider.focus()
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        page.wait_for_function("(b) => document.querySelector('.labkit-memcalc-result').innerText !== b",
                               arg=before, timeout=15_000)
        after = result.inner_text()
        # back to the notebook's own value, so the screenshot shows what its cell asked for (n_ctx=8192)
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("ArrowLeft")
        page.wait_for_function("(b) => document.querySelector('.labkit-memcalc-result').innerText === b",
                               arg=before, timeout=15_000)
        news = page.locator(".jp-toast-message, .Toastify__toast").all_inner_texts()
        page.screenshot(path=str(shot), full_page=False)
        browser.close()
    assert "GiB" in before and before != after
    assert "(8,192 tokens" in before and "(8,192 tokens" not in after, (before, after)   # the cell's n_ctx, then moved
    assert not [t for t in news if "news" in t.lower()], news       # jupyter-config/ turned the news pop-up off
    assert shot.exists() and shot.stat().st_size > 10_000
