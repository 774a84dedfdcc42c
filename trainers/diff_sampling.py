"""The samplers: deterministic, differentiable on request (SeedSelect optimises the starting noise
through them), and the small Euler sampler over a host that previews and class images use.

Convention: k-diffusion's (Karras et al. 2022).  A latent at noise level ``sigma`` is
``x = x0 + sigma * eps``; a *denoiser* ``D(x, sigma) -> x0_hat`` (CFG already applied, if any)
is all a sampler needs.  The samplers here are the deterministic ones ComfyUI offers, written so
that the same noise, sigmas and denoiser give ComfyUI's own result (``SamplerCustomAdvanced``):

* ``euler``    - Karras et al. alg. 2 without churn: ``x <- x + (x - D) / sigma * (sigma' - sigma)``
                 (ComfyUI ``sample_euler``).
* ``ddim``     - DDIM with eta 0 (Song et al. 2021): ``x <- D + sigma' * eps_hat``.  In k-diffusion
                 space that *is* the Euler step (``eps_hat = (x - D) / sigma``), which is why
                 ComfyUI's "ddim" runs ``sample_euler``; the DDIM flavour comes from the
                 ``ddim_uniform`` sigma schedule (timesteps 951, 901, ..., 1 at 20 steps).
* ``dpmpp_2m`` - DPM-Solver++(2M) (Lu et al. 2022), multistep on the x0 estimates in
                 ``t = -log sigma`` (ComfyUI ``sample_dpmpp_2m``).

Memory: a seed is optimised by back-propagating through every step, so plain autograd would keep
every UNet activation of every step.  Each step runs under ``torch.utils.checkpoint``
(non-reentrant): only its inputs (one latent, plus the previous x0 estimate for DPM++ 2M) are kept
and the step is recomputed during backward, so activation memory is that of *one* step, whatever
the number of steps.  The seed and the sampler state stay fp32; the denoiser may compute in bf16
(``autocast``), which is where the FLOPs are.

The start: ComfyUI scales unit noise ``n`` by ``sqrt(1 + sigma^2)`` when the schedule starts at
the model's largest sigma ("max denoise"), else by ``sigma`` (``model_sampling.noise_scaling``);
``initial_latent`` does the same so an optimised noise reproduces inside ComfyUI.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .objective import cfg_combine
from .precision import autocast_for
from .seam import Denoiser, Host
#: called after every step with (step index, x before the step, x0 estimate of the step)
StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]

SAMPLERS = ("euler", "ddim", "dpmpp_2m")
SCHEDULERS = ("normal", "simple", "ddim_uniform", "karras", "exponential")


# ----------------------------------------------------------------------------------------------
# checks


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not supported for seed optimisation; use one of "
                         f"{', '.join(SAMPLERS)} (deterministic samplers: ancestral and SDE samplers add "
                         "fresh noise every step, so no starting noise alone reproduces their result)")
    return name


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """A 1-D, finite, non-increasing schedule of at least two levels, ending at >= 0."""
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or sigmas.numel() < 2:
        shape = tuple(sigmas.shape) if torch.is_tensor(sigmas) else type(sigmas).__name__
        raise ValueError(f"sigmas must be a 1-D schedule of at least 2 noise levels (1 step), got {shape}")
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()):
        raise ValueError("sigmas must be finite and non-negative")
    if bool((sigmas[1:] > sigmas[:-1]).any()):
        raise ValueError("sigmas must decrease (a sampling schedule from noisy to clean)")
    if float(sigmas[0]) <= 0:
        raise ValueError("the schedule starts at sigma 0: there is no noise to optimise")
    return sigmas


# ----------------------------------------------------------------------------------------------
# schedules over a model's discrete training sigmas (ascending, like ``Host.training_sigmas``)


def _sigma_at(log_sigmas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Log-linear interpolation of the training sigmas at continuous timesteps ``t``."""
    lo = t.floor().long().clamp(0, len(log_sigmas) - 1)
    hi = t.ceil().long().clamp(0, len(log_sigmas) - 1)
    w = t - lo
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()


def make_sigmas(training_sigmas: torch.Tensor, scheduler: str, steps: int) -> torch.Tensor:
    """``steps + 1`` sigmas (the last 0) from a model's ascending training sigmas, as ComfyUI's
    scheduler of the same name builds them; fp32 on CPU."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    sig = training_sigmas.detach().double().cpu()
    n = len(sig)
    if scheduler == "normal":  # evenly spaced timesteps from the last to the first
        out = _sigma_at(sig.log(), torch.linspace(n - 1, 0, steps, dtype=torch.float64))
    elif scheduler == "simple":  # every (n / steps)-th training sigma, from the top
        stride = n / steps
        out = torch.stack([sig[-(1 + int(i * stride))] for i in range(steps)])
    elif scheduler == "ddim_uniform":  # DDIM's timesteps 1, 1 + k, 1 + 2k, ... (steps_offset 1)
        stride = max(n // steps, 1)
        out = sig[1::stride].flip(0)
    else:
        out = _karras_or_exponential(scheduler, float(sig[0]), float(sig[-1]), steps)
    return torch.cat([out, out.new_zeros(1)]).float()


def _karras_or_exponential(kind: str, sigma_min: float, sigma_max: float, steps: int) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if kind == "karras":  # Karras et al. 2022 eq. 5, rho 7
        rho = 7.0
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (hi + ramp * (lo - hi)) ** rho
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


# ----------------------------------------------------------------------------------------------
# the start


def starts_at_max(sigmas: torch.Tensor, sigma_max: float) -> bool:
    """ComfyUI's "max denoise" test (``Sampler.max_denoise``)."""
    first = float(sigmas[0])
    return math.isclose(float(sigma_max), first, rel_tol=1e-5) or first > float(sigma_max)


def noise_scale(sigmas: torch.Tensor, sigma_max: float) -> float:
    """The factor ComfyUI multiplies unit noise by before the first step."""
    s = float(sigmas[0])
    return math.sqrt(1.0 + s * s) if starts_at_max(sigmas, sigma_max) else s


def initial_latent(noise: torch.Tensor, sigmas: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Unit noise -> the first sampler state (empty latent image: ``x0`` is 0)."""
    return noise * noise_scale(sigmas, sigma_max)


# ----------------------------------------------------------------------------------------------
# one step of each sampler (pure functions of tensors; coefficients in the sigmas' dtype)


def euler_step(x, den, sigma, sigma_next):
    d = (x - den) / sigma
    return x + d * (sigma_next - sigma)


def ddim_step(x, den, sigma, sigma_next):
    eps = (x - den) / sigma
    return den + sigma_next * eps


def dpmpp_2m_step(x, den, old_den, sigma_prev, sigma, sigma_next):
    """``old_den`` None: the first step (or the last, to sigma 0) is first order."""
    if float(sigma_next) == 0:
        return den  # exp(-inf) = 0: the state is the x0 estimate
    h = sigma.log() - sigma_next.log()  # t_next - t with t = -log(sigma)
    ratio = sigma_next / sigma
    if old_den is None:
        return ratio * x - (-h).expm1() * den
    r = (sigma_prev.log() - sigma.log()) / h  # h_last / h
    den_d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old_den
    return ratio * x - (-h).expm1() * den_d


# ----------------------------------------------------------------------------------------------
# the sampler


class _Step:
    """One sampler step as a function of tensors only, so ``checkpoint`` can re-run it."""

    def __init__(self, sampler: str, denoiser: Denoiser, sigmas: torch.Tensor, i: int,
                 compute_dtype: torch.dtype | None):
        self.sampler, self.denoiser, self.i = sampler, denoiser, i
        self.sigmas, self.compute_dtype = sigmas, compute_dtype

    def __call__(self, x: torch.Tensor, old_den: torch.Tensor | None):
        s = self.sigmas
        sigma, sigma_next = s[self.i], s[self.i + 1]
        with autocast_for(x.device, self.compute_dtype):
            den = self.denoiser(x, sigma * x.new_ones([x.shape[0]]))
        den = den.to(x.dtype)  # the state stays in the seed's precision
        if self.sampler == "euler":
            return euler_step(x, den, sigma, sigma_next), den
        if self.sampler == "ddim":
            return ddim_step(x, den, sigma, sigma_next), den
        prev = s[self.i - 1] if self.i > 0 else None
        return dpmpp_2m_step(x, den, old_den, prev, sigma, sigma_next), den


def sample(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, sampler: str = "euler", *,
           keep: Sequence[int] = (), use_checkpoint: bool = True, compute_dtype: torch.dtype | None = None,
           on_step: StepHook | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run ``sampler`` from ``x`` (already scaled: see ``initial_latent``) over ``sigmas``.

    Returns the final latent and the x0 estimates of the steps in ``keep`` (negative indices count
    from the end: ``keep=(-3, -2, -1)`` = the last three).  Differentiable in ``x``; with
    ``use_checkpoint`` each step is recomputed in backward instead of stored (flat memory).
    """
    check_sampler(sampler)
    sigmas = check_sigmas(sigmas).to(x.device, x.dtype)
    n = len(sigmas) - 1
    wanted = {k % n for k in keep}
    kept: dict[int, torch.Tensor] = {}
    old_den = None
    for i in range(n):
        step = _Step(sampler, denoiser, sigmas, i, compute_dtype)
        if use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
            x_next, den = checkpoint(step, x, old_den, use_reentrant=False)
        else:
            x_next, den = step(x, old_den)
        if on_step is not None:
            on_step(i, x, den)
        if i in wanted:
            kept[i] = den
        x, old_den = x_next, (den if sampler == "dpmpp_2m" else None)
    return x, kept


def invert(denoiser: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor, *,
           compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """DDIM inversion (the deterministic step run backwards, Song et al. 2021 / Mokady et al.
    2022): a clean latent -> the state at ``sigmas[0]`` that the ``ddim`` sampler maps (close) to
    it.  No gradients.  The first step starts at the smallest non-zero sigma with ``x = x0``."""
    levels = check_sigmas(sigmas).to(x0.device, x0.dtype)
    levels = levels[levels > 0].flip(0)  # ascending
    x = x0
    with torch.no_grad():
        for i in range(len(levels) - 1):
            sigma, sigma_next = levels[i], levels[i + 1]
            with autocast_for(x.device, compute_dtype):
                den = denoiser(x, sigma * x.new_ones([x.shape[0]])).to(x.dtype)
            x = ddim_step(x, den, sigma, sigma_next)
    return x


# ----------------------------------------------------------------------------------------------
# previews and class images: Euler over a seam host


def preview_sigmas(host: Host, steps: int) -> torch.Tensor:
    """``steps`` of the model's own training sigmas, evenly spaced in timestep (ComfyUI's "simple"
    scheduler), then 0: a preview looks like what the user's sampler will produce."""
    sig = host.training_sigmas()
    idx = torch.linspace(len(sig) - 1, 0, steps, device=sig.device).round().long()
    return torch.cat([sig[idx], sig.new_zeros(1)])


def host_denoiser(host: Host, cond, uncond=None, cfg: float = 1.0) -> Denoiser:
    """The host's denoiser for one conditioning, with classifier-free guidance against ``uncond``
    (None or cfg 1: none)."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        den = host.denoise(x, sigma, cond).float()
        if uncond is None or cfg == 1.0:
            return den
        return cfg_combine(den, host.denoise(x, sigma, uncond).float(), cfg)

    return denoise


@torch.no_grad()
def sample_euler(host: Host, cond, uncond, *, shape: tuple[int, ...], steps: int = 20, cfg: float = 5.0,
                 seed: int = 0) -> torch.Tensor:
    """Latents sampled with Euler and classifier-free guidance (``uncond`` None or cfg 1: none).

    The noise comes from a private generator: never touch the global RNG (ComfyUI reseeds it)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    sigmas = preview_sigmas(host, steps)
    x = torch.randn(shape, generator=gen).to(host.device) * sigmas[0]
    return sample(host_denoiser(host, cond, uncond, cfg), x, sigmas, "euler", use_checkpoint=False)[0]


__all__ = ["Denoiser", "preview_sigmas", "host_denoiser", "sample_euler", "SAMPLERS", "SCHEDULERS", "check_sampler", "check_sigmas", "make_sigmas",
           "noise_scale", "initial_latent", "starts_at_max", "sample", "invert",
           "euler_step", "ddim_step", "dpmpp_2m_step"]
