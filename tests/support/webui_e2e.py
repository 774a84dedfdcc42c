"""What the real-WebUI tests do through a running server (``forge_server.ForgeServer``,
``a1111_server.A1111Server``): a training run through the extension's API route, a txt2img through
the WebUI's own API, and a headless-Chromium screenshot of the Likeness tab."""
from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("LIKENESS_CHROMIUM", "/usr/bin/chromium"))


def train(server, req: dict) -> dict:
    """Start a run through ``/likeness/v1/runs`` and poll it to its end."""
    run = server.post("/likeness/v1/runs", req)
    t0 = time.time()
    while time.time() - t0 < 900:
        got = server.get(f"/likeness/v1/runs/{run['id']}")
        if got["state"] in ("done", "cancelled", "failed"):
            return got
        time.sleep(1)
    raise AssertionError(f"run {run['id']} did not finish")


def image(server, prompt: str) -> bytes:
    """The RGB bytes of a small, seeded txt2img of ``prompt`` by the WebUI's own API."""
    out = server.post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 7,
                                            "cfg_scale": 5, "sampler_name": "Euler"})
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).convert("RGB").tobytes()


def screenshot(server, folder: Path, name: str = "likeness-tab.png") -> Path | None:
    """The Likeness tab of the running WebUI, full page, as ``folder/name`` (``$LIKENESS_BROWSER_ARTIFACTS``
    when set); None without Chromium.  Gradio 4 (Forge) marks tabs with the ``tab`` role, gradio 3
    (AUTOMATIC1111) draws them as buttons."""
    if not CHROMIUM.is_file():
        print("no Chromium: screenshot skipped")
        return None
    pw = pytest.importorskip("playwright.sync_api")
    folder = Path(os.environ.get("LIKENESS_BROWSER_ARTIFACTS") or folder)
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / name
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url, timeout=300_000)
        page.get_by_text("Likeness", exact=True).first.wait_for(timeout=300_000)
        tab = page.get_by_role("tab", name="Likeness")
        (tab if tab.count() else page.get_by_role("button", name="Likeness", exact=True)).first.click(timeout=120_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    return shot
