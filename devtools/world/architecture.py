"""The base model's architecture: SD-family components, small enough to train on a CPU.

CLIPTokenizer (the CLIP BPE vocabulary) → CLIPTextModel (hidden 64, 3 layers) → UNet2DConditionModel
on 8×8×4 latents of an AutoencoderKL (3 down blocks: latent factor 4, 32 px images — the world's
64 px renders box-filtered 2× down; their 8-px patterns become 4-px ones, in phase with the
latent grid.  A 64 px / factor-8 variant did not train in the CPU time available), DDPM noise
schedule exactly as Stable Diffusion 1.x (scaled_linear 0.00085–0.012, 1000 steps, epsilon).
Saved as a ``StableDiffusionPipeline`` folder (weights stored fp16 to keep the folder small) whose
``tokenizer/`` holds only its config: the BPE files are the package's shipped ones.

The shipped model's folder, size and loaders (``BASE_MODEL_DIR``, ``RESOLUTION``,
``load_tokenizer``, ``load_pipeline``) live in ``likeness.world.model``; they are re-exported here
so the training script reads everything about the model from one module.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from likeness.world.model import BASE_MODEL_DIR, RESOLUTION, load_pipeline, load_tokenizer

TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=64, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
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
TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def write_tokenizer(dest) -> None:
    """Write an SD1-style ``tokenizer/`` folder holding only ``tokenizer_config.json`` (the pad
    token is all that differs between CLIP tokenizers): the BPE files are byte-identical to the
    package's shipped ones, and the loaders take those, so the model keeps no 1.5 MB copy."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
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


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


__all__ = ["BASE_MODEL_DIR", "RESOLUTION", "load_pipeline", "load_tokenizer", "TEXT_CONFIG", "VAE_CONFIG",
           "UNET_CONFIG", "SCHEDULER_CONFIG", "TOKENIZER_CONFIG", "write_tokenizer", "build_text_encoder",
           "build_vae", "build_unet", "build_scheduler", "n_params"]
