"""Shared pytest fixtures.  Each block names its owner; add new fixtures in a block of their own."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers beside the tests: tiny_models, support


# ---- tiny diffusers hosts (owner: hosts/diffusers/; builders in tests/tiny_models.py) ---------
# Session-scoped and seeded: built once per run.  Random weights - for contract tests only (shapes,
# gradients, frozen weights, files).  Tests that must show *learning* (TI / LoRA / SeedSelect
# recovering a known answer) use `pretrained_tiny_sd1`, never the random hosts: see
# tests/tiny_models.py.


@pytest.fixture(scope="session")
def tiny_sd1_host():
    """SD1-shaped, eps, one CLIP text encoder of width 32 (key clip_l)."""
    import tiny_models

    return tiny_models.tiny_host("sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_host():
    """SD2-shaped, v-prediction, one OpenCLIP-like text encoder of width 48 (key clip_h)."""
    import tiny_models

    return tiny_models.tiny_host("sd2", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_host():
    """SDXL-shaped, eps, clip_l (32) + clip_g (64, with projection), size conditioning."""
    import tiny_models

    return tiny_models.tiny_host("sdxl", seed=0)


@pytest.fixture(scope="session")
def pretrained_tiny_sd1():
    """``tiny_models.PretrainedTiny``: an SD1-shaped host briefly trained on synthetic classes named
    by real words (``.words``), with ``.prompt(word)``, ``.images(word, n, seed)`` and
    ``.latents(word, n, seed)``; ``host.token_embeddings(word)`` is the embedding to recover."""
    import tiny_models

    return tiny_models.pretrain_tiny_sd1(seed=0)


# ---- end tiny diffusers hosts ------------------------------------------------------------------


# ---- ComfyUI in the test process (owner: tests/support/comfy_runtime.py) ------------------------
# One ComfyUI per session: it can be imported only once, so every `comfyui` module shares it.


@pytest.fixture(scope="session")
def comfy_checkout():
    """The ComfyUI checkout (``COMFYUI_PATH``), checked at the end of the session: its models, input,
    output, user and temp folders list the same files as before (tests write below temporary base
    directories only).  Skips where there is no checkout (CI)."""
    from support import comfy_runtime

    root = comfy_runtime.comfy_path()
    if root is None:
        pytest.skip(comfy_runtime.SKIP_REASON)
    before = comfy_runtime.checkout_listing(root)
    yield root
    assert comfy_runtime.checkout_listing(root) == before, "the tests wrote into the ComfyUI checkout"


@pytest.fixture(scope="session")
def comfy_root(comfy_checkout, tmp_path_factory):
    """That checkout imported in this process with a temporary base directory."""
    from support import comfy_runtime

    comfy_runtime.setup_comfy(comfy_checkout, tmp_path_factory.mktemp("comfy_base"))
    return comfy_checkout


@pytest.fixture(scope="session")
def likeness_nodes(comfy_root):
    """The node classes ComfyUI registered when it loaded this package as a custom node
    (``nodes.load_custom_node`` on the repository root, V3 ``comfy_entrypoint``): loaded once per
    session, since a second load registers nothing new and every module must see the same set."""
    import asyncio

    import nodes

    from support import comfy_runtime

    before = set(nodes.NODE_CLASS_MAPPINGS)
    assert asyncio.run(nodes.load_custom_node(str(comfy_runtime.REPO))), "ComfyUI could not load the package"
    return {k: nodes.NODE_CLASS_MAPPINGS[k] for k in set(nodes.NODE_CLASS_MAPPINGS) - before}


# ---- end ComfyUI ---------------------------------------------------------------------------------


# ---- test order (owner: tests/test_browser.py's engineer) ------------------------------------------
# `--reverse-order` runs the collected tests last to first: the ComfyUI modules share one ComfyUI
# per session, so running them backwards shows whether one module depends on what another loaded.


def pytest_addoption(parser):
    parser.addoption("--reverse-order", action="store_true", default=False,
                     help="run the collected tests in reverse order (shows tests that depend on an earlier one)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse-order"):
        items.reverse()


# ---- end test order ----------------------------------------------------------------------------------
