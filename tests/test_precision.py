"""Low precision never eats an update (issue 12, item 2), shown on the CPU in bf16 and fp16:

* a full fine-tune's delta is added to the weight as loaded (fp16/fp32), in fp32, and rounded once
  to the compute dtype, so a 1e-4 relative change reaches a bf16 forward that the bf16 copy alone
  would round away; the checkpoint is written from the weights as loaded (bit-identical where
  nothing was trained);
* a DreamBooth LoRA step in bf16/fp16 moves the model (the adapter is a branch with fp32 factors);
* SeedSelect in fp16 scales its loss, so the seed's gradient does not underflow to zero.
"""
from __future__ import annotations

import safetensors.torch
import pytest
import torch

from likeness.hosts.diffusers import DiffusersHost
from likeness.trainers import data as D
from likeness.trainers.dreambooth import DreamBoothConfig, train_dreambooth
from likeness.trainers.lora import LoraAdapter

import tiny_models


def _source_file(tmp_path, family: str = "sd1"):
    """A tiny single-file checkpoint in the mix real files have (fp16, a few fp32 tensors), and the
    config folder to load it with."""
    host = tiny_models.tiny_host(family, seed=0)
    src = tmp_path / "src.safetensors"
    host.save_checkpoint(src, {})
    sd = safetensors.torch.load_file(str(src))
    sd = {k: (v.half() if v.is_floating_point() and i % 7 else v) for i, (k, v) in enumerate(sorted(sd.items()))}
    safetensors.torch.save_file(sd, str(src))
    config = tiny_models.save_diffusers_folder(tiny_models.host_parts(host), tmp_path / "config")
    return src, config


def _load(src, config, dtype) -> DiffusersHost:
    return DiffusersHost.load(src, device="cpu", dtype=dtype, config_dir=config)


def _all_zero_deltas(host) -> dict[str, torch.Tensor]:
    """A full fine-tune of every tunable parameter (UNet and text encoders) after 0 steps."""
    parts = ["unet", *(e.key for e in host.text_encoders())]
    return {n: torch.zeros(p.shape) for part in parts for n, p in host.tunable_parameters(part).items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_full_finetune_checkpoint_of_zero_steps_is_bit_identical_to_its_source(tmp_path, dtype):
    src, config = _source_file(tmp_path)
    host = _load(src, config, dtype)
    assert host.compute_dtype == dtype
    out = host.save_checkpoint(tmp_path / "out.safetensors", _all_zero_deltas(host))
    a, b = safetensors.torch.load_file(str(src)), safetensors.torch.load_file(str(out))
    assert set(a) == set(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors not written back bit-identical, e.g. {differ[:3]}"


def test_a_small_full_finetune_delta_reaches_the_bf16_forward_and_the_file(tmp_path):
    """A delta of 1e-4 of each weight (below half a bf16 step of every element: the bf16 copy plus
    the delta is the bf16 copy again) is added to the fp32 weight as loaded and rounded once: the
    forward sees exactly that, the output moves, and the checkpoint holds the fp32 sum rounded once
    to the file's dtype."""
    host = tiny_models.tiny_host("sd1", seed=0)
    src = tmp_path / "src.safetensors"
    host.save_checkpoint(src, {})  # fp32
    config = tiny_models.save_diffusers_folder(tiny_models.host_parts(host), tmp_path / "config")
    bf = _load(src, config, torch.bfloat16)
    name = [n for n in bf.tunable_parameters("unet") if n.endswith("attn1.to_q.weight")][0]
    w32 = host.tunable_parameters("unet")[name]
    d = 1e-4 * w32
    assert torch.equal(bf.tunable_parameters("unet")[name] + d.to(torch.bfloat16), bf.tunable_parameters("unet")[name])
    fn = {name: lambda w: (w.float() + d).to(w.dtype)}  # what dreambooth's full mode patches with
    module = bf.unet.get_submodule(name[len("unet."): -len(".weight")])
    x, sig = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, 5.0])
    cond = bf.encode_text(["a dog", "a cat"])
    with torch.no_grad():
        plain = bf.denoise(x, sig, cond)
        with bf.parameter_patches(fn):
            seen = module.weight.detach().clone()
            moved = bf.denoise(x, sig, cond)
    assert torch.equal(seen, (w32 + d).to(torch.bfloat16))
    assert not torch.equal(moved, plain)
    out = safetensors.torch.load_file(str(bf.save_checkpoint(tmp_path / "out.safetensors", {name: d})))
    ref = safetensors.torch.load_file(str(src))
    changed = [k for k in ref if not torch.equal(ref[k], out[k])]
    assert len(changed) == 1 and out[changed[0]].dtype == torch.float32
    torch.testing.assert_close(out[changed[0]], w32 + d, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_one_lora_step_in_low_precision_moves_the_model(tmp_path, dtype):
    """One DreamBooth LoRA step at lr 1e-4 on a bf16/fp16 model: the fp32 factors moved, and the
    model with the result computes something else than the base model."""
    host = tiny_models.tiny_host("sd1", seed=0, dtype=dtype)
    imgs = D.images_from_batch(torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0)))
    cfg = DreamBoothConfig(name="s", output_dir=tmp_path, instance_prompt="a photo of sks_lk dog", steps=1,
                           save_every=0, preview_every=0, learning_rate=1e-4)
    res = train_dreambooth(host, imgs, cfg)
    assert res.skipped_steps == 0
    adapters = {f"{m}.weight": LoraAdapter(torch.nn.Parameter(dn), torch.nn.Parameter(up), a)
                for m, (dn, up, a) in res.lora_layers.items()}
    assert all(float(a.up.detach().abs().max()) > 0 for a in adapters.values())
    x, sig = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([2.0])
    cond = host.encode_text(["a photo of sks_lk dog"])
    with torch.no_grad():
        plain = host.denoise(x, sig, cond)
        with host.module_branches({n: a.branch for n, a in adapters.items()}):
            tuned = host.denoise(x, sig, cond)
    assert not torch.equal(tuned, plain)


class _HalfToySeedModel:
    """A ``SeedModel`` computing in fp16 on the CPU: a smooth denoiser and a per-patch linear
    "VAE" behind a sigmoid, both run in fp16 as a half-precision UNet and VAE run."""

    device, compute_dtype = torch.device("cpu"), torch.float16
    latent_channels, latent_scale, latent_multiple = 4, 8, 1

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.w = (torch.randn(8 * 8 * 3, 4, generator=g) / 2).half()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        self.sigmas = ((1 - ac) / ac).sqrt().float()

    def training_sigmas(self):
        return self.sigmas

    def denoiser(self, x, sigma):
        c = (1.0 / (1.0 + sigma.view(-1, 1, 1, 1) ** 2)).half()
        h = x.half()
        return (c * h + 0.3 * torch.tanh(h.roll(1, dims=-1)) * (1 - c)).float()

    def decode(self, z):
        b, _, h, w = z.shape
        patches = torch.einsum("pc,bchw->bhwp", self.w, z.half()).reshape(b, h, w, 8, 8, 3)
        return torch.sigmoid(patches.permute(0, 1, 3, 2, 4, 5).reshape(b, h * 8, w * 8, 3)).float()

    def encode_images(self, images):
        raise NotImplementedError("the test gives its targets directly")

    def run(self, sigmas, cfg, fn, shape=None):
        return fn(self.denoiser)


class _MeanColour:
    """An ``ImageEncoder``: a fixed projection of the mean colour (fp32)."""

    def __init__(self):
        self.p = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))

    def embed(self, images):
        return images.float().mean(dim=(1, 2)) @ self.p


def test_seedselect_in_fp16_scales_its_loss_so_the_seed_gradient_survives():
    """The seed's gradient passes the fp16 denoiser and VAE; with a small semantic loss it is below
    fp16's smallest number there and arrives as exactly zero without loss scaling.  The loop
    scales an fp16 method's loss (dynamically, on the CPU as on CUDA), so it arrives non-zero."""
    import torch.nn.functional as F

    from likeness.trainers import loop
    from likeness.trainers import seedselect as S

    model, vision = _HalfToySeedModel(), _MeanColour()
    cfg = S.SeedSelectConfig(width=32, height=32, steps=4, lambda_semantic=1e-6, lambda_appearance=0.0,
                             use_checkpoint=False, iterations=1)
    obj = S._Objective(model, vision, S.schedule(model, cfg), cfg)
    targets = (F.normalize(torch.ones(8), dim=0), torch.zeros(1, 4, 4, 4), None)
    z = S.random_noise((1, 4, 4, 4), 0).requires_grad_(True)
    obj(model.denoiser, z, *targets).loss.backward()  # no scaling: what the loop did on the CPU
    assert z.grad is not None and float(z.grad.abs().max()) == 0.0
    z.grad = None
    seen = []

    class Probe:
        def parameters(self):
            return [z]

        def loss(self, step):
            return obj(model.denoiser, z, *targets).loss

        def after_step(self, step):
            seen.append(z.grad.detach().clone())

    res = loop.run(Probe(), loop.LoopConfig(steps=1, learning_rate=0.1, autocast=False), device=model.device,
                   compute_dtype=model.compute_dtype, save=lambda step: None)
    assert res.skipped_steps == 0 and len(seen) == 1
    assert bool(torch.isfinite(seen[0]).all()) and float(seen[0].abs().max()) > 0
