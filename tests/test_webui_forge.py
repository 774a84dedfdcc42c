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

import pytest

from support import forge_runtime
from support.webui_e2e import assert_generation_uses_them, running, screenshot, train_ti_and_lora, webui_root

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

    with running(ForgeServer(root, tmp_path_factory.mktemp("forge-data"), forge_runtime.forge_checkpoint("sd15"))) as s:
        yield s


def test_ti_and_lora_trained_in_forge_change_forges_own_generation(forge, tmp_path):
    train_ti_and_lora(forge, tmp_path / "disc")
    assert_generation_uses_them(forge)
    assert not LOAD_ERRORS.search(forge.log()), forge.log()[-3000:]
    screenshot(forge, tmp_path)
