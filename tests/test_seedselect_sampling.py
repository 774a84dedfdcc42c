"""Differentiable samplers (trainers/diff_sampling.py): ComfyUI's math, gradients through every
step, flat memory.  CPU, tiny models; ComfyUI's own functions are compared in
tests/test_comfy_seedselect.py."""
from __future__ import annotations

import math

import pytest
import torch

from likeness.trainers import diff_sampling as DS

torch.set_num_threads(1)


def sd_training_sigmas() -> torch.Tensor:
    """SD's scaled-linear DDPM schedule as k-diffusion sigmas (ascending)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    return ((1 - ac) / ac).sqrt()


def toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear, sigma-dependent x0 estimate (stands in for a UNet)."""
    s = sigma.to(x.dtype).view(-1, 1, 1, 1)
    c = 1.0 / (1.0 + s**2)
    return c * x + 0.3 * torch.tanh(x.roll(1, dims=-1)) * (1 - c)


# ---- float64 references, written from k-diffusion / DDIM as ComfyUI runs them ------------------

def ref_euler(den, x, sigmas):
    for i in range(len(sigmas) - 1):
        d = (x - den(x, sigmas[i].expand(x.shape[0]))) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def ref_dpmpp_2m(den, x, sigmas):
    t_fn = lambda s: s.log().neg()  # noqa: E731
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    old = None
    for i in range(len(sigmas) - 1):
        d = den(x, sigmas[i].expand(x.shape[0]))
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * d
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old)
        old = d
    return x


def ref_ddim_vp(den, x, sigmas):
    """DDIM (eta 0) in the scheduler's own variance-preserving space, alpha_bar = 1 / (1 + sigma^2):
    x_vp = sqrt(ab) x;  x_vp' = sqrt(ab') x0 + sqrt(1 - ab') eps."""
    ab = 1 / (1 + sigmas**2)
    xv = ab[0].sqrt() * x
    for i in range(len(sigmas) - 1):
        xk = xv / ab[i].sqrt()
        x0 = den(xk, sigmas[i].expand(x.shape[0]))
        eps = (xv - ab[i].sqrt() * x0) / (1 - ab[i]).sqrt()
        xv = ab[i + 1].sqrt() * x0 + (1 - ab[i + 1]).sqrt() * eps
    return xv / ab[-1].sqrt()


REFS = {"euler": ref_euler, "ddim": ref_ddim_vp, "dpmpp_2m": ref_dpmpp_2m}


@pytest.mark.parametrize("scheduler", ["normal", "ddim_uniform", "karras"])
@pytest.mark.parametrize("sampler", DS.SAMPLERS)
def test_sampler_matches_float64_reference(sampler, scheduler):
    sigmas = DS.make_sigmas(sd_training_sigmas(), scheduler, 12)
    z = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    x = DS.initial_latent(z, sigmas, float(sd_training_sigmas()[-1]))
    ours, _ = DS.sample(toy_denoiser, x.clone().requires_grad_(True), sigmas, sampler)
    ref = REFS[sampler](toy_denoiser, x.double(), sigmas.double())
    err = (ours.detach().double() - ref).abs().max() / ref.abs().max()
    assert err < 2e-5, f"{sampler}/{scheduler}: relative error {err:.2e}"


def test_samplers_solve_the_gaussian_ode():
    """Data ~ N(0, s^2) has the exact denoiser x s^2/(s^2+sigma^2) and the exact probability-flow
    solution x_T * s / sqrt(s^2 + sigma_T^2): every sampler converges to it, DPM++ 2M fastest."""
    s2 = 0.25
    den = lambda x, sig: x * s2 / (s2 + sig.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    sigmas = DS.make_sigmas(sd_training_sigmas(), "karras", 40).double()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    exact = x * s2**0.5 / (s2 + sigmas[0] ** 2).sqrt()
    errs = {s: float((DS.sample(den, x, sigmas, s)[0] - exact).abs().max() / exact.abs().max()) for s in DS.SAMPLERS}
    assert max(errs.values()) < 0.05, errs
    assert errs["dpmpp_2m"] < errs["euler"] / 3, errs


def test_schedules_are_comfyuis():
    sig = sd_training_sigmas()
    ddim = DS.make_sigmas(sig, "ddim_uniform", 20)
    assert len(ddim) == 21 and ddim[-1] == 0
    # DDIM's timesteps 951, 901, ..., 1 (SeedSelect's DDIMScheduler with steps_offset=1)
    assert torch.allclose(ddim[:-1], sig[torch.arange(951, 0, -50)].float())
    normal = DS.make_sigmas(sig, "normal", 20)
    assert math.isclose(float(normal[0]), float(sig[-1]), rel_tol=1e-6)
    assert math.isclose(float(normal[-2]), float(sig[0]), rel_tol=1e-5)
    assert DS.starts_at_max(normal, float(sig[-1])) and not DS.starts_at_max(ddim, float(sig[-1]))
    assert DS.noise_scale(normal, float(sig[-1])) == pytest.approx(math.sqrt(1 + float(sig[-1]) ** 2))
    assert DS.noise_scale(ddim, float(sig[-1])) == pytest.approx(float(ddim[0]))
    for name in DS.SCHEDULERS:
        s = DS.make_sigmas(sig, name, 7)
        # ComfyUI's ddim_uniform strides by 1000 // steps and so can give a step more (8 here)
        assert len(s) == (9 if name == "ddim_uniform" else 8) and bool((s[1:] <= s[:-1]).all())


@pytest.mark.parametrize("bad", ["euler_ancestral", "dpmpp_2m_sde", "lcm", ""])
def test_unsupported_sampler_is_refused(bad):
    with pytest.raises(ValueError, match="not supported for seed optimisation"):
        DS.sample(toy_denoiser, torch.zeros(1, 4, 2, 2), torch.tensor([1.0, 0.0]), bad)


@pytest.mark.parametrize("sigmas", [torch.tensor([1.0]), torch.tensor([0.5, 1.0, 0.0]),
                                    torch.tensor([0.0, 0.0]), torch.tensor([float("nan"), 0.0])])
def test_bad_sigmas_are_refused(sigmas):
    with pytest.raises(ValueError, match="sigmas|sigma 0"):
        DS.check_sigmas(sigmas)


# ---- on a tiny SD1 model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_denoiser(tiny_sd1_host):
    from likeness.trainers.seedselect import SeamSeedModel

    model = SeamSeedModel(tiny_sd1_host, "a photo of a cat", "")
    box = {}
    model.run(None, 2.0, lambda den: box.setdefault("den", den))  # CFG 2: cond + uncond every step
    return box["den"], tiny_sd1_host.training_sigmas()


@pytest.mark.parametrize("sampler", DS.SAMPLERS)
def test_gradients_reach_the_seed_through_every_step(tiny_denoiser, sampler):
    den, train_sig = tiny_denoiser
    sigmas = DS.make_sigmas(train_sig, "normal", 6)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    grads = {}

    def hook(i, x, _den):
        x.register_hook(lambda g, i=i: grads.__setitem__(i, float(g.norm())))

    final, kept = DS.sample(den, DS.initial_latent(z, sigmas, float(train_sig[-1])), sigmas, sampler,
                            keep=(-2, -1), on_step=hook)
    (final.square().mean() + kept[4].square().mean()).backward()
    assert sorted(grads) == list(range(6)), "a step's input got no gradient"
    assert all(g > 0 and math.isfinite(g) for g in grads.values()), grads
    assert z.grad is not None and float(z.grad.norm()) > 0


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn`` builds its graph (distinct storages;
    frozen weights excluded: they exist anyway)."""
    seen: dict[int, int] = {}

    def pack(t):
        if not (isinstance(t, torch.nn.Parameter) or t.requires_grad is False and t.grad_fn is None and t.is_leaf
                and t.numel() > 10000):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_memory_is_flat_in_the_number_of_steps(tiny_denoiser, sampler):
    den, train_sig = tiny_denoiser
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    def run(steps, ckpt):
        sigmas = DS.make_sigmas(train_sig, "normal", steps)
        return lambda: DS.sample(den, DS.initial_latent(z, sigmas, float(train_sig[-1])), sigmas, sampler,
                                 use_checkpoint=ckpt)[0].sum()

    flat2, flat20 = _saved_bytes(run(2, True)), _saved_bytes(run(20, True))
    full2, full20 = _saved_bytes(run(2, False)), _saved_bytes(run(20, False))
    assert full20 > 5 * full2, "the measure does not see activations"  # sanity of the probe itself
    assert flat20 < 1.5 * max(flat2, 1) + 20 * 2 * z.numel() * 4, (flat2, flat20)
    assert flat20 < full20 / 20, (flat20, full20)
