"""The shapes world's base model as it ships: where it is, its image size, how to load it.

A Stable Diffusion 1.x-shaped ``StableDiffusionPipeline`` folder (world/base_model, 32 px images,
8×8×4 latents; architecture and training: ``devtools/world`` in the repository and
world/base_model/TRAINING.md).  Its ``tokenizer/`` holds only ``tokenizer_config.json``: the CLIP
BPE files are the ones the package ships for every model (the diffusers host's), so the loaders
here pass that tokenizer in instead of reading a second copy.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BASE_MODEL_DIR = PACKAGE_DIR / "base_model"
RESOLUTION = 32          # the model's image size: world renders (64 px) box-filtered 2× down


def tokenizer_dir() -> Path:
    """Where the CLIP BPE files the base model uses are: the package's shipped copy."""
    from ..hosts.diffusers import CLIP_TOKENIZER_DIR

    return Path(CLIP_TOKENIZER_DIR)


def load_tokenizer(path=None):
    """The tokenizer of the base model at ``path`` (default: the shipped one): the shipped BPE
    files with the pad token its ``tokenizer/tokenizer_config.json`` names."""
    from ..hosts.diffusers import folder_tokenizer

    return folder_tokenizer(Path(path or BASE_MODEL_DIR) / "tokenizer")


def load_pipeline(path=None, dtype=None):
    """The base model as a diffusers ``StableDiffusionPipeline`` (offline, fp32 by default)."""
    import torch
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path or BASE_MODEL_DIR), tokenizer=load_tokenizer(path), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, local_files_only=True)
    return pipe.to(dtype=dtype or torch.float32)
