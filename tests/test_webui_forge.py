"""What a Forge user does: the extension installed in a real Stable Diffusion WebUI Forge (CPU,
loopback, its own data folder), a Textual Inversion and a DreamBooth LoRA trained through the
extension's API route on the tiny SD1 checkpoint (and an SDXL embedding on the tiny SDXL one), then images generated through Forge's own txt2img
API with the embedding's name / ``<lora:name:1>`` in the prompt, which differ from the same prompt
without them, and no loading error in Forge's log.  A headless-Chromium screenshot of the tab is
saved in ``LIKENESS_BROWSER_ARTIFACTS`` or the test's temporary folder (printed).

    FORGE_PATH=~/.cache/likeness/forge python -m pytest -m webui tests/test_webui_forge.py

Skipped, with the reason, without ``FORGE_PATH`` or Forge's own requirements (gradio...) in the
environment; the screenshot step without Playwright and Chromium.
"""
from __future__ import annotations

import base64
import io
import os
import re
import time
from pathlib import Path

import pytest

from support import forge_runtime
from support.images import write_disc_images

pytestmark = [pytest.mark.webui, pytest.mark.slow]
CHROMIUM = Path(os.environ.get("LIKENESS_CHROMIUM", "/usr/bin/chromium"))
#: Forge's messages for an embedding or LoRA file it could not use (text_processing/textual_inversion.py,
#: sd_forge_lora/networks.py) and an error in our extension
LOAD_ERRORS = re.compile(r"(?i)error loading embedding|lora version mismatch|keys mismatched|unmatched keys"
                         r"|error .*likeness|likeness.*error")


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    root = forge_runtime.forge_path()
    if root is None:
        pytest.skip("FORGE_PATH is not set to a Stable Diffusion WebUI Forge checkout (tests/support/get_webui.sh)")
    pytest.importorskip("gradio", reason="Forge's own requirements (requirements_versions.txt) are not installed")
    from support.forge_server import ForgeServer

    data = tmp_path_factory.mktemp("forge-data")
    server = ForgeServer(root, data, forge_runtime.forge_checkpoint("sd15"),
                         others=[forge_runtime.forge_checkpoint("sdxl")])
    try:
        yield server.start()
    finally:
        server.stop()
        print(f"Forge log: {server.log_path}")


def _train(forge, req: dict) -> dict:
    run = forge.post("/likeness/v1/runs", req)
    t0 = time.time()
    while time.time() - t0 < 900:
        got = forge.get(f"/likeness/v1/runs/{run['id']}")
        if got["state"] in ("done", "cancelled", "failed"):
            return got
        time.sleep(1)
    raise AssertionError(f"run {run['id']} did not finish")


def _image(forge, prompt: str, size: int = 64, **extra) -> bytes:
    import urllib.error

    try:
        out = forge.post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": size, "height": size,
                                               "seed": 7, "cfg_scale": 5, "sampler_name": "Euler", **extra})
    except urllib.error.HTTPError as e:  # Forge's traceback is in its log, not in the response
        raise AssertionError(f"txt2img failed ({e}):\n{forge.log()[-6000:]}") from None
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).convert("RGB").tobytes()


def test_ti_and_lora_trained_in_forge_change_forges_own_generation(forge, tmp_path):
    data = tmp_path / "cat"
    write_disc_images(data, n=3)
    ti = _train(forge, {"kind": "ti", "name": "lk_disc", "images": str(data), "steps": 3, "init_text": "ball",
                        "learning_rate": 0.5, "preview_every": 0, "resolution": 64})
    assert ti["state"] == "done", ti["error"]
    assert Path(ti["files"][0]).parent == forge.data / "embeddings" and "`lk_disc`" in ti["message"]
    lora = _train(forge, {"kind": "lora", "name": "lk_lora", "images": str(data), "steps": 3, "rank": 4,
                          "instance_prompt": "a photo of sks_lk ball", "learning_rate": 0.05, "preview_every": 0,
                          "resolution": 64})
    assert lora["state"] == "done", lora["error"]
    assert Path(lora["files"][0]).parent == forge.data / "models" / "Lora"
    plain = _image(forge, "a photo of a ball")
    assert _image(forge, "a photo of lk_disc") != _image(forge, "a photo of")
    assert _image(forge, "a photo of a ball <lora:lk_lora:1>") != plain
    assert not LOAD_ERRORS.search(forge.log()), forge.log()[-3000:]
    _screenshot(forge, tmp_path)


def test_sdxl_embedding_trained_in_forge_changes_forges_own_generation(forge, tmp_path):
    """The same for SDXL, which the WebUI's own train tab never offered: both encoders' vectors
    (clip_l + clip_g) trained on the checkpoint the user selected, then used by name."""
    data = tmp_path / "cat"
    write_disc_images(data, n=3)
    forge.use_checkpoint(forge_runtime.forge_checkpoint("sdxl"))
    try:
        ti = _train(forge, {"kind": "ti", "name": "lk_disc_xl", "images": str(data), "steps": 3,
                            "init_text": "ball", "learning_rate": 0.5, "preview_every": 0, "resolution": 64})
        assert ti["state"] == "done", ti["error"]
        from safetensors.torch import load_file

        vectors = load_file(ti["files"][0])
        assert set(vectors) == {"clip_l", "clip_g"}, sorted(vectors)
        assert _image(forge, "a photo of lk_disc_xl", 64) != _image(forge, "a photo of", 64)
        assert not LOAD_ERRORS.search(forge.log()), forge.log()[-3000:]
    finally:
        forge.use_checkpoint(forge.checkpoint)


def test_a_seed_selected_in_forge_is_what_its_txt2img_starts_from(forge, tmp_path):
    """SeedSelect from the tab's API on the loaded model, then Forge's own txt2img with the
    **Likeness seed** section set: the image is not the seed number's, and the same every time."""
    from support.tiny_clip_vision import hf_folder

    data = tmp_path / "refs"
    write_disc_images(data, n=2)
    run = _train(forge, {"kind": "seedselect", "name": "disc_seed", "images": str(data), "steps": 2,
                         "prompt": "a photo of a ball", "clip_vision": str(hf_folder(tmp_path / "cv")),
                         "resolution": 64, "sampling_steps": 2, "cfg": 5})
    assert run["state"] == "done", run["error"]
    assert Path(run["files"][0]) == forge.data / "models" / "likeness_seeds" / "disc_seed.seed.safetensors"
    seeded = {"alwayson_scripts": {"Likeness seed": {"args": ["disc_seed"]}}}
    with_seed = _image(forge, "a photo of a ball", **seeded)
    assert with_seed != _image(forge, "a photo of a ball") and with_seed == _image(forge, "a photo of a ball", **seeded)
    assert not LOAD_ERRORS.search(forge.log()), forge.log()[-3000:]


def _screenshot(forge, tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        print("no Chromium: screenshot skipped")
        return
    pw = pytest.importorskip("playwright.sync_api")
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(forge.url, timeout=300_000)
        page.get_by_role("tab", name="Likeness").click(timeout=120_000)
        page.wait_for_timeout(3000)
        folder = Path(os.environ.get("LIKENESS_BROWSER_ARTIFACTS") or tmp_path)  # kept where asked
        folder.mkdir(parents=True, exist_ok=True)
        shot = folder / "forge-likeness-tab.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
