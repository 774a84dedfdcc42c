"""The base model's architecture: SD-family components, small enough to train on a CPU.

CLIPTokenizer (the CLIP BPE vocabulary) → CLIPTextModel (hidden 64, 3 layers) → UNet2DConditionModel
on 8×8×4 latents of an AutoencoderKL (3 down blocks: latent factor 4, 32 px images — the world's
64 px renders box-filtered 2× down; their 8-px patterns become 4-px ones, in phase with the
latent grid.  A 64 px / factor-8 variant did not train in the CPU time available), DDPM noise
schedule exactly as Stable Diffusion 1.x (scaled_linear 0.00085–0.012, 1000 steps, epsilon).
Saved as a ``StableDiffusionPipeline`` folder (weights stored fp16 to keep the folder small).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BASE_MODEL_DIR = PACKAGE_DIR / "base_model"
TOKENIZER_DIR = PACKAGE_DIR.parent / "hosts" / "assets" / "clip_tokenizer"

TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=64, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
RESOLUTION = 32          # the model's image size: world renders (64 px) box-filtered 2× down
VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
    norm_num_groups=8, sample_size=RESOLUTION, scaling_factor=1.0,
)
UNET_CONFIG = dict(
    sample_size=RESOLUTION // 4, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(48, 96, 96), layers_per_block=1, cross_attention_dim=64,
    attention_head_dim=8, norm_num_groups=16,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, steps_offset=1, timestep_spacing="leading",
)


def tokenizer_dir() -> Path:
    """The shipped CLIP BPE tokenizer files (``LIKENESS_CLIP_TOKENIZER`` overrides)."""
    return Path(os.environ.get("LIKENESS_CLIP_TOKENIZER", TOKENIZER_DIR))


def load_tokenizer(path=None):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(path or tokenizer_dir()), model_max_length=77,
                                         pad_token="<|endoftext|>")


TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def write_tokenizer(dest) -> None:
    """Write an SD1-style ``tokenizer/`` folder: the shipped BPE files + tokenizer_config.json."""
    import json
    import shutil
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_dir() / name, dest / name)
    (dest / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def build_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(**VAE_CONFIG)


def build_unet(**overrides):
    """The denoiser; ``overrides`` replace entries of ``UNET_CONFIG`` (architecture experiments)."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def build_scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(**SCHEDULER_CONFIG)


def load_pipeline(path=None, dtype=None):
    """The shipped base model as a diffusers ``StableDiffusionPipeline`` (offline, fp32 by default)."""
    import torch
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path or BASE_MODEL_DIR), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, local_files_only=True)
    return pipe.to(dtype=dtype or torch.float32)


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())
