"""The server's status page as a person sees it: rendered by headless Chromium, screenshot checked."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.server_fixtures import *  # noqa: F401,F403 - pytest fixtures
from tests.server_fixtures import dyadic_delta, encode_delta

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is installed by scripts/setup.sh")


def _chromium(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--no-first-run", "--disable-extensions", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def test_status_page_renders_charts_in_chromium(server_factory, tmp_path: Path):
    # --public-status: a browser sends no bearer token (by default /status needs the admin token)
    srv = server_factory("--round-goal", "2", "--min-count", "2", "--deadline-s", "60", "--dp-mode", "local",
                         "--clip-norm", "100", "--noise-multiplier", "0.01", "--public-status")
    devices = [srv.device() for _ in range(2)]
    for i in range(3):
        tasks = [d.task() for d in devices]
        for j, (d, t) in enumerate(zip(devices, tasks)):
            body = encode_delta(dyadic_delta(10 * i + j), t["base_version"], metrics={"top1_recall": 0.1 + i / 20})
            assert d.upload(t["round_id"], body).status_code == 200
        srv.wait_round(tasks[0]["round_id"])

    dom = _chromium("--dump-dom", srv.url + "/status")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # The browser parsed five SVG charts with drawn data, and the round count shows.
    assert len(re.findall(r"<svg\b", html)) == 5
    assert "polyline" in html
    for chart in ("chart-rounds", "chart-participants", "chart-versions", "chart-recall", "chart-epsilon"):
        assert f'id="{chart}"' in html

    shot = tmp_path / "status.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1200,1600", srv.url + "/status")
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert image.shape[:2] == (1600, 1200)
    # Not blank: many distinct colours, and the chart area is not one flat colour.
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 50
    assert image[200:1400].std() > 10
