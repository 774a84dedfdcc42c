"""A small deterministic sampler over the seam, for training previews and the demo.

Euler's method on the probability-flow ODE in k-diffusion form (Karras et al. 2022, alg. 1 with
no churn): ``d = (x - x0_hat) / sigma``, ``x <- x + d * (sigma_next - sigma)``.  The schedule takes
``steps`` of the model's own discrete training sigmas, evenly spaced in timestep, as ComfyUI's
"simple" scheduler does, so a preview looks like what the user's sampler will produce.
"""
from __future__ import annotations

import torch

from .seam import Host


def preview_sigmas(host: Host, steps: int) -> torch.Tensor:
    sig = host.training_sigmas()
    idx = torch.linspace(len(sig) - 1, 0, steps, device=sig.device).round().long()
    return torch.cat([sig[idx], sig.new_zeros(1)])


@torch.no_grad()
def sample_euler(host: Host, cond, uncond, *, shape: tuple[int, ...], steps: int = 20, cfg: float = 5.0,
                 seed: int = 0) -> torch.Tensor:
    """Latents sampled with classifier-free guidance (``uncond`` None or cfg 1: no guidance).

    The noise comes from a private generator: never touch the global RNG (ComfyUI reseeds it)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    sigmas = preview_sigmas(host, steps)
    x = torch.randn(shape, generator=gen).to(host.device) * sigmas[0]
    for i in range(steps):
        s = sigmas[i].expand(shape[0])
        den = host.denoise(x, s, cond).float()
        if uncond is not None and cfg != 1.0:
            den_u = host.denoise(x, s, uncond).float()
            den = den_u + cfg * (den - den_u)
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x

