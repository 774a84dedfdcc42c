"""Shared pytest fixtures.  Each block names its owner; add new fixtures in a block of their own."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers beside the tests: tiny_models


# ---- tiny diffusers hosts (owner: hosts/diffusers.py; builders in tests/tiny_models.py) --------
# Session-scoped and seeded: built once per run.  Random weights - for contract tests only (shapes,
# gradients, frozen weights, files).  Tests that must show *learning* (TI / LoRA / SeedSelect
# recovering a known answer) use `pretrained_tiny_sd1`, never the random hosts: see
# tests/tiny_models.py and shared/reference/testing.md.


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
