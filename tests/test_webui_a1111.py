"""What an AUTOMATIC1111 user does: the extension installed in a real Stable Diffusion WebUI v1.10.1
(CPU, fp32, loopback, its own data folder), a Textual Inversion and a DreamBooth LoRA trained through
the extension's API route on the tiny SD1 checkpoint, then images generated through A1111's own
txt2img API with the embedding's name / ``<lora:name:1>`` in the prompt, which differ from the same
prompt without them, and no loading message in A1111's log (it runs with ``--loglevel DEBUG``: the
LoRA extension reports keys it could not place only at that level).  A headless-Chromium screenshot
of the tab after the runs is saved (``$LIKENESS_BROWSER_ARTIFACTS`` or the test's temporary folder;
printed).  Also SeedSelect: a seed selected through the API is what A1111's txt2img starts from with
the **Likeness seed** section set.

    WEBUI_PATH=~/.cache/likeness/a1111 python -m pytest -m webui tests/test_webui_a1111.py

Skipped, with the reason, without ``WEBUI_PATH`` or A1111's own requirements (gradio...) in the
environment; the screenshot step without Playwright and Chromium.
"""
from __future__ import annotations

import re

import pytest

from support import a1111_runtime
from support.webui_e2e import (assert_generation_uses_them, assert_seed_selected_is_used, running, screenshot,
                               train_ti_and_lora, webui_root)

pytestmark = [pytest.mark.webui, pytest.mark.slow]
#: A1111's messages for an embedding or LoRA file it could not use (modules/textual_inversion,
#: extensions-builtin/Lora/networks.py) and an error in our extension
LOAD_ERRORS = re.compile(r"(?i)error loading embedding|unable to load textual inversion|didn't match keys"
                         r"|failed to load network|networks not found|loading network .*error"
                         r"|error .*likeness|likeness.*error")


@pytest.fixture(scope="module")
def a1111(tmp_path_factory):
    root = webui_root(a1111_runtime.webui_path(), "AUTOMATIC1111", "WEBUI_PATH", "tests/support/get_webui.sh a1111")
    from support.a1111_server import A1111Server

    checkpoint = a1111_runtime.a1111_checkpoint(root, "sd15")
    with running(A1111Server(root, tmp_path_factory.mktemp("a1111-data"), checkpoint)) as server:
        yield server


def test_ti_and_lora_trained_in_a1111_change_a1111s_own_generation(a1111, tmp_path):
    train_ti_and_lora(a1111, tmp_path / "disc")
    assert_generation_uses_them(a1111)
    assert not LOAD_ERRORS.search(a1111.log()), a1111.log()[-3000:]
    screenshot(a1111, tmp_path, "likeness-tab-a1111.png")


def test_a_seed_selected_in_a1111_is_what_its_txt2img_starts_from(a1111, tmp_path):
    """SeedSelect from the tab's API on A1111's model, then its own txt2img with the **Likeness
    seed** section set: the image is not the seed number's, and the same every time."""
    assert_seed_selected_is_used(a1111, tmp_path)
    assert not LOAD_ERRORS.search(a1111.log()), a1111.log()[-3000:]
