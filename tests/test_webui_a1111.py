"""What an AUTOMATIC1111 user does: the extension installed in a real Stable Diffusion WebUI v1.10.1
(CPU, fp32, loopback, its own data folder), a Textual Inversion and a DreamBooth LoRA trained through
the extension's API route on the tiny SD1 checkpoint, then images generated through A1111's own
txt2img API with the embedding's name / ``<lora:name:1>`` in the prompt, which differ from the same
prompt without them, and no loading message in A1111's log (it runs with ``--loglevel DEBUG``: the
LoRA extension reports keys it could not place only at that level).  A headless-Chromium screenshot
of the tab after the runs is saved (``$LIKENESS_BROWSER_ARTIFACTS`` or the test's temporary folder;
printed).

    WEBUI_PATH=~/.cache/likeness/a1111 python -m pytest -m webui tests/test_webui_a1111.py

Skipped, with the reason, without ``WEBUI_PATH`` or A1111's own requirements (gradio...) in the
environment; the screenshot step without Playwright and Chromium.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from support import a1111_runtime
from support.images import write_disc_images
from support.webui_e2e import image, screenshot, train

pytestmark = [pytest.mark.webui, pytest.mark.slow]
#: A1111's messages for an embedding or LoRA file it could not use (modules/textual_inversion,
#: extensions-builtin/Lora/networks.py) and an error in our extension
LOAD_ERRORS = re.compile(r"(?i)error loading embedding|unable to load textual inversion|didn't match keys"
                         r"|failed to load network|networks not found|loading network .*error"
                         r"|error .*likeness|likeness.*error")


@pytest.fixture(scope="module")
def a1111(tmp_path_factory):
    root = a1111_runtime.webui_path()
    if root is None:
        pytest.skip("WEBUI_PATH is not set to an AUTOMATIC1111 checkout (tests/support/get_webui.sh a1111)")
    pytest.importorskip("gradio", reason="AUTOMATIC1111's own requirements (requirements_versions.txt) are not installed")
    from support.a1111_server import A1111Server

    data = tmp_path_factory.mktemp("a1111-data")
    server = A1111Server(root, data, a1111_runtime.a1111_checkpoint(root, "sd15"))
    try:
        yield server.start()
    finally:
        server.stop()
        print(f"A1111 log: {server.log_path}")


def test_ti_and_lora_trained_in_a1111_change_a1111s_own_generation(a1111, tmp_path):
    data = tmp_path / "disc"
    write_disc_images(data, n=3)
    ti = train(a1111, {"kind": "ti", "name": "lk_disc", "images": str(data), "steps": 3, "init_text": "ball",
                       "learning_rate": 0.5, "preview_every": 0, "resolution": 64})
    assert ti["state"] == "done", ti["error"]
    assert Path(ti["files"][0]).parent == a1111.data / "embeddings" and "`lk_disc`" in ti["message"]
    lora = train(a1111, {"kind": "lora", "name": "lk_lora", "images": str(data), "steps": 3, "rank": 4,
                         "instance_prompt": "a photo of sks_lk ball", "learning_rate": 0.05, "preview_every": 0,
                         "resolution": 64})
    assert lora["state"] == "done", lora["error"]
    assert Path(lora["files"][0]).parent == a1111.data / "models" / "Lora"
    plain = image(a1111, "a photo of a ball")
    assert image(a1111, "a photo of lk_disc") != image(a1111, "a photo of")
    assert image(a1111, "a photo of a ball <lora:lk_lora:1>") != plain
    assert image(a1111, "a photo of a ball") == plain  # the LoRA is gone again: the model was restored
    assert not LOAD_ERRORS.search(a1111.log()), a1111.log()[-3000:]
    screenshot(a1111, tmp_path, "likeness-tab-a1111.png")
