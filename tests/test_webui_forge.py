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

import re

import pytest

from support import forge_runtime
from support.images import write_disc_images
from support.webui_e2e import (assert_generation_uses_them, assert_seed_selected_is_used, image, running,
                               screenshot, train, train_ti_and_lora, webui_root)

pytestmark = [pytest.mark.webui, pytest.mark.slow]
#: Forge's messages for an embedding or LoRA file it could not use (text_processing/textual_inversion.py,
#: sd_forge_lora/networks.py) and an error in our extension
LOAD_ERRORS = re.compile(r"(?i)error loading embedding|lora version mismatch|keys mismatched|unmatched keys"
                         r"|error .*likeness|likeness.*error")


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    root = webui_root(forge_runtime.forge_path(), "Stable Diffusion WebUI Forge", "FORGE_PATH",
                      "tests/support/get_webui.sh forge")
    from support.forge_server import ForgeServer

    server = ForgeServer(root, tmp_path_factory.mktemp("forge-data"), forge_runtime.forge_checkpoint("sd15"),
                         others=[forge_runtime.forge_checkpoint("sdxl")])
    with running(server):
        yield server


def test_ti_and_lora_trained_in_forge_change_forges_own_generation(forge, tmp_path):
    train_ti_and_lora(forge, tmp_path / "disc")
    assert_generation_uses_them(forge)
    assert not LOAD_ERRORS.search(forge.log()), forge.log()[-3000:]
    screenshot(forge, tmp_path, "forge-likeness-tab.png")


def test_sdxl_embedding_and_lora_trained_in_forge_change_forges_own_generation(forge, tmp_path):
    """The same for SDXL, which the WebUI's own train tab never offered: both encoders' vectors
    (clip_l + clip_g) trained on the checkpoint the user selected, then used by name; and a LoRA
    that Forge's LoRA loader applies to the SDXL UNet."""
    data = tmp_path / "cat"
    write_disc_images(data, n=3)
    forge.use_checkpoint(forge_runtime.forge_checkpoint("sdxl"))
    try:
        ti = train(forge, {"kind": "ti", "name": "lk_disc_xl", "images": str(data), "steps": 3,
                           "init_text": "ball", "learning_rate": 0.5, "preview_every": 0, "resolution": 64})
        assert ti["state"] == "done", ti["error"]
        from safetensors.torch import load_file

        vectors = load_file(ti["files"][0])
        assert set(vectors) == {"clip_l", "clip_g"}, sorted(vectors)
        assert image(forge, "a photo of lk_disc_xl", 64) != image(forge, "a photo of", 64)
        lora = train(forge, {"kind": "lora", "name": "lk_lora_xl", "images": str(data), "steps": 3, "rank": 4,
                             "instance_prompt": "a photo of sks_lk ball", "learning_rate": 0.05,
                             "preview_every": 0, "resolution": 64})
        assert lora["state"] == "done", lora["error"]
        assert image(forge, "a photo of a ball <lora:lk_lora_xl:1>", 64) != image(forge, "a photo of a ball", 64)
        assert not LOAD_ERRORS.search(forge.log()), forge.log()[-3000:]
    finally:
        forge.use_checkpoint(forge.checkpoint)


def test_a_seed_selected_in_forge_is_what_its_txt2img_starts_from(forge, tmp_path):
    """SeedSelect from the tab's API on the loaded model, then Forge's own txt2img with the
    **Likeness seed** section set: the image is not the seed number's, and the same every time."""
    assert_seed_selected_is_used(forge, tmp_path)
    assert not LOAD_ERRORS.search(forge.log()), forge.log()[-3000:]
