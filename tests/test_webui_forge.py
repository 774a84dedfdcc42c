"""What a Forge user does: the extension installed in a real Stable Diffusion WebUI Forge (CPU,
loopback, its own data folder), a Textual Inversion and a DreamBooth LoRA trained through the
extension's API route on the tiny SD1 checkpoint, then images generated through Forge's own txt2img
API with the embedding's name / ``<lora:name:1>`` in the prompt, which differ from the same prompt
without them, and no loading error in Forge's log.  A headless-Chromium screenshot of the tab is
saved in the test's temporary folder (printed).

    FORGE_PATH=~/.cache/likeness/forge python -m pytest -m webui tests/test_webui_forge.py

Skipped, with the reason, without ``FORGE_PATH`` or Forge's own requirements (gradio...) in the
environment; the screenshot step without Playwright and Chromium.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from support import forge_runtime
from support.images import write_disc_images
from support.webui_e2e import image, screenshot, train

pytestmark = [pytest.mark.webui, pytest.mark.slow]
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
    server = ForgeServer(root, data, forge_runtime.forge_checkpoint("sd15"))
    try:
        yield server.start()
    finally:
        server.stop()
        print(f"Forge log: {server.log_path}")


def test_ti_and_lora_trained_in_forge_change_forges_own_generation(forge, tmp_path):
    data = tmp_path / "cat"
    write_disc_images(data, n=3)
    ti = train(forge, {"kind": "ti", "name": "lk_disc", "images": str(data), "steps": 3, "init_text": "ball",
                       "learning_rate": 0.5, "preview_every": 0, "resolution": 64})
    assert ti["state"] == "done", ti["error"]
    assert Path(ti["files"][0]).parent == forge.data / "embeddings" and "`lk_disc`" in ti["message"]
    lora = train(forge, {"kind": "lora", "name": "lk_lora", "images": str(data), "steps": 3, "rank": 4,
                         "instance_prompt": "a photo of sks_lk ball", "learning_rate": 0.05, "preview_every": 0,
                         "resolution": 64})
    assert lora["state"] == "done", lora["error"]
    assert Path(lora["files"][0]).parent == forge.data / "models" / "Lora"
    plain = image(forge, "a photo of a ball")
    assert image(forge, "a photo of lk_disc") != image(forge, "a photo of")
    assert image(forge, "a photo of a ball <lora:lk_lora:1>") != plain
    assert not LOAD_ERRORS.search(forge.log()), forge.log()[-3000:]
    screenshot(forge, tmp_path)
