"""The denoising objective every method shares, in k-diffusion's convention (Karras et al. 2022):
a clean latent ``x0`` is noised as ``x = x0 + sigma * noise`` and the host's denoiser returns its
estimate of ``x0``.

* ``noised``: a training sample at one of the model's own discrete noise levels (uniform in
  timestep, as SD was trained), from a private generator so ComfyUI's reseeding of the global
  RNG never changes a run;
* ``native_error``: the per-sample MSE in the network's own parameterisation (eps or v), which is
  ``((x0_hat - x0) / output_scale(sigma))**2`` - the loss the model was trained with;
* ``held_out_loss``: that loss on fixed draws, to compare models on the same images;
* ``min_snr_weights``: Min-SNR-gamma weighting (Hang et al. 2023);
* ``cfg_combine``: classifier-free guidance exactly as ComfyUI's ``cfg_function`` blends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .seam import Host


@dataclass
class Noised:
    x: torch.Tensor  # [B, C, h, w] noisy latents, on x0's device
    sigma: torch.Tensor  # [B] noise levels, on the sigma table's device
    noise: torch.Tensor  # [B, C, h, w] the unit noise drawn (with any offset), on x0's device


def noised(x0: torch.Tensor, sigmas: torch.Tensor, gen: torch.Generator, noise_offset: float = 0.0) -> Noised:
    """Noise ``x0`` at levels drawn uniformly from ``sigmas`` (the model's training table).

    The draws come from ``gen`` (CPU) in a fixed order - timesteps, noise, offset - so a seed
    always gives the same run.  ``noise_offset`` adds a per-channel constant to the noise, which
    lets the model learn overall brightness (Guttenberg 2023)."""
    t = torch.randint(0, len(sigmas), (x0.shape[0],), generator=gen)
    sigma = sigmas[t.to(sigmas.device)]
    noise = torch.randn(x0.shape, generator=gen)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(x0.shape[:2] + (1, 1), generator=gen)
    noise = noise.to(x0.device)
    return Noised(x0 + noise * sigma.view(-1, 1, 1, 1), sigma, noise)


def native_error(host: Host, x0_hat: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error ``[B]`` in the network's own parameterisation (eps-MSE for eps
    models, v-MSE for v models), from the host's x0 estimate."""
    scale = host.output_scale(sigma).float().view(-1, 1, 1, 1)
    return (((x0_hat.float() - x0) / scale) ** 2).mean(dim=tuple(range(1, x0.ndim)))


def held_out_loss(host: Host, latents: torch.Tensor, cond, draws: int = 32, seed: int = 123) -> float:
    """The mean native loss of ``latents`` under ``cond`` over ``draws`` fixed (noise level, noise)
    draws: the same yardstick for every model or vector compared on the same images."""
    gen = torch.Generator("cpu").manual_seed(seed)
    sigmas = host.training_sigmas()
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            n = noised(latents, sigmas, gen)
            total += float(native_error(host, host.denoise(n.x, n.sigma, cond), latents, n.sigma).mean())
    return total / draws


def min_snr_weights(sigma: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma per sample; SNR = 1/sigma^2 in k-diffusion's x = x0 + sigma * noise.  eps loss:
    min(snr, gamma)/snr; v loss: min(snr, gamma)/(snr + 1) (Hang et al. 2023, the paper's form)."""
    snr = 1.0 / sigma.double() ** 2
    w = snr.clamp(max=gamma) / (snr + 1 if prediction == "v" else snr)
    return w.float()


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + (cond - uncond) * scale`` (ComfyUI's ``cfg_function``)."""
    return uncond + (cond - uncond) * scale


__all__ = ["Noised", "noised", "native_error", "held_out_loss", "min_snr_weights", "cfg_combine"]
