"""An explorer widget renders and responds in a real browser: JupyterLab + headless Chromium (Debian's
`chromium` and `chromium-driver`, selenium), all offline. Skipped, saying why, where those are not installed."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from switch_sae_core.paths import project_root

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                 reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")]

CELL = """import torch
from switch_sae_core.config import SAEConfig
from switch_sae_core.saes.base import build_sae
from switch_sae_core.viz.widgets import ExpertExplorer, compute_feature_stats
torch.manual_seed(0)
sae = build_sae(SAEConfig(arch="switch", d_in=16, n_features=64, n_experts=4, k=4))
ExpertExplorer(sae, compute_feature_stats(sae, torch.randn(256, 16))).show()"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path):
    """A JupyterLab server on a notebook holding one ExpertExplorer; yields its URL."""
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": CELL}],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "probe.ipynb").write_text(json.dumps(nb))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(project_root()), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={tmp_path}",
         "--LabApp.expose_app_in_browser=True", "--allow-root"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"))
    try:
        deadline = time.time() + 90
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.time() > deadline:
                pytest.fail("JupyterLab did not start: " + (tmp_path / "server.log").read_text()[-1500:])
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/lab/tree/probe.ipynb"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _headings(driver) -> list[str]:
    return [h.text for h in driver.find_elements("css selector", ".jp-OutputArea-output h3")]


def test_expert_explorer_renders_once_and_follows_the_dropdown(jupyter_lab):
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        wait = WebDriverWait(driver, 180, poll_frequency=0.5)
        driver.get(jupyter_lab)
        wait.until(lambda d: d.execute_script(
            "const app = window.jupyterapp; const w = app && app.shell.currentWidget;"
            "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
            " && w.sessionContext.session.kernel.connectionStatus === 'connected')"))
        driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        wait.until(lambda d: d.find_elements("css selector", ".jp-OutputArea-output select"))
        wait.until(lambda d: any(h.startswith("expert 0:") for h in _headings(d)))
        assert [h.split(":")[0] for h in _headings(driver)] == ["expert 0"]  # the live view only, no static copy

        Select(driver.find_elements("css selector", ".jp-OutputArea-output select")[0]).select_by_visible_text("expert 2")
        wait.until(lambda d: [h.split(":")[0] for h in _headings(d)] == ["expert 2"])  # the kernel answered
    finally:
        driver.quit()
