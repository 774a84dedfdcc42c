"""What the real-WebUI tests do through a running server (``forge_server.ForgeServer``,
``a1111_server.A1111Server``): a training run through the extension's API route, a txt2img through
the WebUI's own API, and a headless-Chromium screenshot of the Likeness tab."""
from __future__ import annotations

import base64
import contextlib
import io
import os
import time
from pathlib import Path

import pytest

from .images import write_disc_images

CHROMIUM = Path(os.environ.get("LIKENESS_CHROMIUM", "/usr/bin/chromium"))


def webui_root(root: Path | None, webui: str, env: str, setup: str) -> Path:
    """``root``, or skip the test saying why: ``env`` does not name a ``webui`` checkout (made by
    ``setup``), or the WebUI's own requirements (gradio...) are not installed here."""
    if root is None:
        pytest.skip(f"{env} is not set to a {webui} checkout ({setup})")
    pytest.importorskip("gradio", reason=f"{webui}'s own requirements (requirements_versions.txt) are not installed")
    return root


@contextlib.contextmanager
def running(server):
    """The started ``server``, stopped (by its own pid) when the block ends; its log's path printed."""
    try:
        yield server.start()
    finally:
        server.stop()
        print(f"{type(server).__name__} log: {server.log_path}")


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


def image(server, prompt: str, size: int = 64, **extra) -> bytes:
    """The RGB bytes of a small, seeded txt2img of ``prompt`` by the WebUI's own API (``extra``: more
    request fields); a failure shows the WebUI's log, where its traceback is."""
    import urllib.error

    try:
        out = server.post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": size, "height": size,
                                                "seed": 7, "cfg_scale": 5, "sampler_name": "Euler", **extra})
    except urllib.error.HTTPError as e:
        raise AssertionError(f"txt2img failed ({e}):\n{server.log()[-6000:]}") from None
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).convert("RGB").tobytes()


def train_ti_and_lora(server, folder: Path) -> None:
    """What the real-WebUI tests train, on a few disc images in ``folder``: a TI ``lk_disc`` (into the
    WebUI's ``embeddings/``, the message naming the word) and a LoRA ``lk_lora`` (into
    ``models/Lora``), a few steps each at 64 px."""
    write_disc_images(folder, n=3)
    ti = train(server, {"kind": "ti", "name": "lk_disc", "images": str(folder), "steps": 3, "init_text": "ball",
                        "learning_rate": 0.5, "preview_every": 0, "resolution": 64})
    assert ti["state"] == "done", ti["error"]
    assert Path(ti["files"][0]).parent == server.data / "embeddings" and "`lk_disc`" in ti["message"]
    lora = train(server, {"kind": "lora", "name": "lk_lora", "images": str(folder), "steps": 3, "rank": 4,
                          "instance_prompt": "a photo of sks_lk ball", "learning_rate": 0.05, "preview_every": 0,
                          "resolution": 64})
    assert lora["state"] == "done", lora["error"]
    assert Path(lora["files"][0]).parent == server.data / "models" / "Lora"


def assert_generation_uses_them(server) -> None:
    """The WebUI's own txt2img changes with the embedding's name / ``<lora:lk_lora:1>`` in the prompt,
    and is back to the plain image once the LoRA is left out again (the WebUI restored its model)."""
    plain = image(server, "a photo of a ball")
    assert image(server, "a photo of lk_disc") != image(server, "a photo of")
    assert image(server, "a photo of a ball <lora:lk_lora:1>") != plain
    assert image(server, "a photo of a ball") == plain


def assert_seed_selected_is_used(server, folder: Path) -> None:
    """SeedSelect through the API on the loaded model, then the WebUI's own txt2img with the
    **Likeness seed** section set: the image is not the seed number's, and the same every time."""
    from .tiny_clip_vision import hf_folder

    write_disc_images(folder / "refs", n=2)
    run = train(server, {"kind": "seedselect", "name": "disc_seed", "images": str(folder / "refs"), "steps": 2,
                         "prompt": "a photo of a ball", "clip_vision": str(hf_folder(folder / "cv")),
                         "resolution": 64, "sampling_steps": 2, "cfg": 5})
    assert run["state"] == "done", run["error"]
    assert Path(run["files"][0]) == server.data / "models" / "likeness_seeds" / "disc_seed.seed.safetensors"
    seeded = {"alwayson_scripts": {"Likeness seed": {"args": ["disc_seed"]}}}
    with_seed = image(server, "a photo of a ball", **seeded)
    assert with_seed != image(server, "a photo of a ball") and with_seed == image(server, "a photo of a ball", **seeded)


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
