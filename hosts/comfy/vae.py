"""ComfyUI's VAE as both Likeness sides use it (``ComfyHost`` and ``ComfySeedModel``): pixels to
model-space latents, and back either as a preview or differentiably.

``VAE.decode`` is not differentiable (it copies into a preallocated buffer with in-place ops, and
its weights are inference tensors), so the differentiable path calls the first-stage model
directly, loaded through a clone of the VAE's patcher that carries identity weight wrappers
(``patching.add_identity_wrappers``): every weight is copied per forward and the shared VAE module
is never touched.
"""
from __future__ import annotations

import torch

import comfy.model_management

from .patching import add_identity_wrappers


class ComfyVAE:
    """``vae`` (ComfyUI VAE) paired with the BaseModel whose latent format scales its latents;
    results live on ``device`` (the MODEL's load device)."""

    def __init__(self, vae, base_model, device: torch.device):
        self.vae, self.base_model, self.device = vae, base_model, device
        self.patcher = vae.patcher.clone()
        add_identity_wrappers(self.patcher)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3+]`` in [0, 1] -> scaled latents ``[B, C, H/f, W/f]`` fp32, no gradients."""
        with torch.inference_mode():
            raw = self.vae.encode(images[..., :3])
        with torch.inference_mode(False), torch.no_grad():
            lat = raw.clone().to(self.device, torch.float32)
            return self.base_model.process_latent_in(lat).float()

    def decode(self, latents: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
        """Scaled latents -> ``[B, H, W, 3]`` in [0, 1] fp32: a CPU preview through ComfyUI's own
        ``VAE.decode``, or (``differentiable``) on ``device`` with the graph kept to ``latents``."""
        if differentiable:
            return self._decode_differentiable(latents)
        with torch.inference_mode():
            img = self.vae.decode(self.base_model.process_latent_out(latents.detach().float()))
        with torch.inference_mode(False):
            return img[..., :3].clone().float().cpu().clamp(0, 1)

    def _decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        comfy.model_management.load_models_gpu([self.patcher])
        vae = self.vae
        raw = self.base_model.process_latent_out(latents.float())
        img = vae.first_stage_model.decode(raw.to(vae.device, vae.vae_dtype)).float()
        return ((img + 1) / 2).clamp(0, 1).movedim(1, -1)[..., :3].to(self.device)


__all__ = ["ComfyVAE"]
