"""SeedSelect on the diffusers host: a differentiable VAE decode and the ``SeedModel`` adapter.

``DiffusersHost.decode_latents`` runs under ``no_grad`` (previews); SeedSelect's semantic loss
needs gradients through the decoder to the latents, so this module decodes with the host's own
VAE module directly.  The host object is only read, never changed.
"""
from __future__ import annotations

import torch

from ..trainers.seedselect import SeamSeedModel
from .diffusers import DiffusersHost


def vae_decoder(host: DiffusersHost):
    """Model-space latents -> ``[B, H, W, 3]`` in [0, 1], differentiable (the inverse of the host's
    ``encode_images`` scaling)."""
    cfg = host.vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0

    def decode(latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(host.device, host.vae.dtype) / cfg.scaling_factor + shift
        x = host.vae.decode(z).sample.float()
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    return decode


def unet_downsamplings(host: DiffusersHost) -> int:
    """How many times the UNet halves the latent: its sides must be multiples of 2**this."""
    return len(host.unet.config.block_out_channels) - 1


def seed_model(host: DiffusersHost, prompt: str, negative: str = "") -> SeamSeedModel:
    return SeamSeedModel(host, prompt, negative, decode=vae_decoder(host),
                         latent_multiple=2 ** unet_downsamplings(host))


__all__ = ["vae_decoder", "seed_model", "unet_downsamplings"]
