"""Random-weight models on the diffusers host, built from the configs the package ships: what
``bench/gpu.py --host diffusers`` trains (the CLI's host; the CPU smoke where no ComfyUI exists).

Like ``comfy_env``: the real architectures with random weights, scaled by the same rule
(``comfy_env.random_like``) so half-precision activations stay finite.  ``tiny=True`` keeps the
real tokenizer, text width and VAE but gives the UNet one level and the text encoder one layer, so
the CPU rehearsal runs the same code in seconds; SDXL's tiny workloads use SD1.5, as comfy_env's do.
"""
from __future__ import annotations

import torch

from comfy_env import random_like

_FAMILY = {"sd15": "sd1", "sdxl": "sdxl"}
#: the CPU rehearsal's UNet: one cross-attention level, one res block, the real text width
_TINY_UNET = dict(block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D"], layers_per_block=1, attention_head_dim=4)
_TINY_VISION = dict(hidden_size=32, image_size=32, intermediate_size=64, num_attention_heads=4,
                    num_hidden_layers=2, patch_size=8, projection_dim=16)
#: SeedSelect's encoder at full size: OpenCLIP ViT-H/14's vision tower
_VIT_H = dict(hidden_size=1280, image_size=224, intermediate_size=5120, num_attention_heads=16,
              num_hidden_layers=32, patch_size=14, projection_dim=1024, hidden_act="gelu")


def _randomized(module: torch.nn.Module, device, seed: int) -> torch.nn.Module:
    """``module`` (built on ``device``) with random weights by comfy_env's rule, in fp32.  Built
    for real rather than on the meta device: buffers outside the state dict (CLIP's position ids)
    must keep their values."""
    weights = random_like(module, device, seed)
    module.load_state_dict({k: v.float() for k, v in weights.items()})
    return module


def load_host(arch: str, tiny: bool = False, device: str | None = None, dtype: torch.dtype | None = None):
    """A ``DiffusersHost`` over random-weight modules of ``arch`` ("sd15" or "sdxl")."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from likeness.hosts.diffusers import DiffusersHost
    from likeness.hosts.diffusers.folder import config_folder, folder_scheduler, folder_tokenizer
    from likeness.trainers.families import family as family_spec

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    family = "sd1" if tiny else _FAMILY[arch]
    folder = config_folder(family)
    unet_cfg = UNet2DConditionModel.load_config(str(folder / "unet"), local_files_only=True)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config({**unet_cfg, **(_TINY_UNET if tiny else {})})
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae"), local_files_only=True))
        tes = []
        for enc in family_spec(family).encoders:
            cfg = CLIPTextConfig.from_pretrained(str(folder / enc.component), local_files_only=True)
            if tiny:
                cfg.num_hidden_layers = 1
            cls = CLIPTextModelWithProjection if enc.component == "text_encoder_2" else CLIPTextModel
            tes.append(cls(cfg))
    toks = [folder_tokenizer(folder / e.component.replace("text_encoder", "tokenizer"))
            for e in family_spec(family).encoders]
    modules = [_randomized(m, device, seed) for seed, m in enumerate([unet, vae, *tes], start=1)]
    return DiffusersHost.from_components(
        modules[0], modules[1], toks, modules[2:], folder_scheduler(folder / "scheduler"), family=family,
        name=f"random-{arch}", device=device, dtype=dtype or (torch.float16 if device == "cuda" else torch.float32))


def random_clip_vision(tiny: bool = False, device: str | None = None):
    """SeedSelect's image encoder as the CLI loads one (``HFClipVision``), random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from likeness.hosts.diffusers.clip_vision import HFClipVision

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(device):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**(_TINY_VISION if tiny else _VIT_H)))
    return HFClipVision(_randomized(model, device, 4))
