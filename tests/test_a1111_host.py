"""What the AUTOMATIC1111 host refuses before any work, on a model A1111's own loader built (marker
``webui``; skipped without ``WEBUI_PATH``): a checkpoint family it does not train yet, and a WebUI
started with ``--medvram`` / ``--lowvram``, whose forward hooks move weights between devices.  Each
refusal says what to do instead, and the model is left as it was.

    WEBUI_PATH=~/.cache/likeness/a1111 python -m pytest -m webui tests/test_a1111_host.py
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.webui


@pytest.fixture(scope="module")
def model():
    from support import a1111_runtime

    root = a1111_runtime.in_this_process()
    return a1111_runtime.load_tiny(root, "sd15")


@pytest.mark.parametrize("flags, words", [({"is_sd1": False, "is_sdxl": True}, "SDXL"),
                                          ({"is_sd1": False, "is_sd2": True}, "SD2.x"),
                                          ({"lowvram": True}, "--medvram or --lowvram")])
def test_refused_before_any_work_with_advice(model, flags, words):
    from likeness.hosts.webui.a1111 import A1111Host

    A1111Host(model)  # the model as loaded trains
    saved = {k: getattr(model, k) for k in flags}
    try:
        for k, v in flags.items():
            setattr(model, k, v)
        with pytest.raises(ValueError, match="Forge") as e:
            A1111Host(model)
    finally:
        for k, v in saved.items():
            setattr(model, k, v)
    assert words in str(e.value) and "likeness" in str(e.value)
