"""SeedSelect (trainers/seedselect.py) on CPU: recovery of a known seed, bad input, bootstrap,
contrastive loss, Cancel.  The recovery test uses a small analytic model whose VAE is exactly
invertible (so the references' appearance target is reachable) and the tiny SD1 host for the
end-to-end path through the diffusers adapter."""
from __future__ import annotations

import math

import pytest
import torch

from likeness.trainers import diff_sampling as DS
from likeness.trainers import seedselect as S

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vision():
    """A tiny random CLIP vision tower with projection (transformers), frozen."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from likeness.hosts.diffusers import HFClipVision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
        return HFClipVision(CLIPVisionModelWithProjection(cfg))


class ToySeedModel:
    """A ``SeedModel`` small enough to optimise in a second: a smooth nonlinear denoiser on SD's
    noise schedule, and a per-8x8-patch linear "VAE" behind a sigmoid whose encoder is its exact
    inverse, so references rendered from a seed have a reachable appearance target."""

    device, compute_dtype = torch.device("cpu"), torch.float32
    latent_channels, latent_scale, latent_multiple = 4, 8, 1

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.w = torch.randn(8 * 8 * 3, 4, generator=g) / 2  # latent cell -> 8x8 RGB patch
        self.w_pinv = torch.linalg.pinv(self.w)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        self.sigmas = ((1 - ac) / ac).sqrt().float()
        self.runs = []

    def training_sigmas(self):
        return self.sigmas

    def denoiser(self, x, sigma):
        c = 1.0 / (1.0 + sigma.view(-1, 1, 1, 1) ** 2)
        return c * x + 0.3 * torch.tanh(x.roll(1, dims=-1)) * (1 - c)

    def decode(self, z):
        b, _, h, w = z.shape
        patches = torch.einsum("pc,bchw->bhwp", self.w, z).reshape(b, h, w, 8, 8, 3)
        return torch.sigmoid(patches.permute(0, 1, 3, 2, 4, 5).reshape(b, h * 8, w * 8, 3))

    def encode_images(self, images):
        b, hh, ww, _ = images.shape
        p = images.reshape(b, hh // 8, 8, ww // 8, 8, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, hh // 8, ww // 8, -1)
        return torch.einsum("cp,bhwp->bchw", self.w_pinv, torch.logit(p.clamp(1e-4, 1 - 1e-4)))

    def run(self, sigmas, cfg, fn, shape=None):
        self.runs.append(cfg)
        return fn(self.denoiser)


def references_from(model, seed: int, cfg: S.SeedSelectConfig, n: int = 3) -> torch.Tensor:
    sigmas = S.schedule(model, cfg)
    lat = S.render(model, S.random_noise((1, 4, cfg.height // 8, cfg.width // 8), seed), sigmas, cfg.sampler, cfg.cfg)
    with torch.no_grad():
        img = model.decode(lat)
    jitter = 0.01 * torch.randn(n, *img.shape[1:], generator=torch.Generator().manual_seed(seed))
    return (img + jitter).clamp(0, 1)


def toy_config(**kw) -> S.SeedSelectConfig:
    base = dict(width=64, height=64, steps=8, cfg=1.0, iterations=40, learning_rate=0.2, lr_drop_at=20, seed=1)
    return S.SeedSelectConfig(**{**base, **kw})


@pytest.mark.parametrize("sampler", DS.SAMPLERS)
def test_optimisation_recovers_a_known_seed(vision, sampler):
    model = ToySeedModel()
    cfg = toy_config(sampler=sampler, scheduler="ddim_uniform" if sampler == "ddim" else "normal")
    refs = references_from(model, 12345, cfg)
    res = S.train_seedselect(model, vision, refs, cfg)
    assert res.noise.shape == (1, 4, 8, 8) and res.latents.shape == (1, 4, 8, 8)
    assert res.images.shape == (1, 64, 64, 3)
    sem0, app0 = res.semantic[0], res.appearance[0]
    best = res.best_iteration
    assert res.appearance[best] < app0 / 10, (app0, res.appearance[best])
    assert res.semantic[best] < sem0 / 5, (sem0, res.semantic[best])
    z_star = S.random_noise((1, 4, 8, 8), 12345)
    z_start = S.random_noise((1, 4, 8, 8), 1)
    assert float((res.noise - z_star).norm()) < 0.5 * float((z_start - z_star).norm())
    # the noise reproduces the returned latent with the same sampler and sigmas
    again = S.render(model, res.noise, res.sigmas, sampler, cfg.cfg)
    assert torch.allclose(again, res.latents, atol=1e-4)
    assert math.isclose(float(res.noise.norm()), float(z_start.norm()), rel_tol=1e-4)  # keep_norm


def test_better_starts_and_early_stopping(vision):
    model = ToySeedModel()
    cfg = toy_config(iterations=30)
    refs = references_from(model, 777, cfg)
    plain = S.train_seedselect(model, vision, refs, cfg)
    target = plain.losses[0] / 20
    for start in ("best_of", "inversion"):
        res = S.train_seedselect(model, vision, refs, toy_config(iterations=30, start=start, candidates=6,
                                                                 target_loss=target))
        assert res.start_loss <= plain.losses[0] + 1e-6, start  # never worse than the plain seed's start
        assert res.losses[0] == pytest.approx(res.start_loss, rel=1e-4)
    inv = S.train_seedselect(model, vision, refs, toy_config(iterations=30, start="inversion", target_loss=target))
    assert inv.start_loss < plain.losses[0] / 5  # inverting the references starts next to them
    assert inv.iterations_to_target is not None and inv.iterations_done == inv.iterations_to_target
    assert inv.seconds_to_target is not None and inv.iterations_done < 30


def test_no_cfg_while_optimising_renders_with_cfg(vision):
    model = ToySeedModel()
    cfg = toy_config(iterations=3, cfg=4.0, optimise_cfg=1.0)
    refs = references_from(model, 5, toy_config())
    model.runs.clear()
    res = S.train_seedselect(model, vision, refs, cfg)
    assert model.runs == [1.0, 4.0]  # optimised without guidance, result rendered with it
    assert res.cfg == 4.0


def test_bootstrap_gives_several_distinct_seeds(vision):
    model = ToySeedModel()
    refs = torch.cat([references_from(model, s, toy_config(), n=1) for s in (10, 11, 12, 13)])
    calls = []
    res = S.train_seedselect(model, vision, refs, toy_config(iterations=6, num_seeds=3, bootstrap_iterations=3),
                             progress=lambda i, n, loss, img: calls.append((i, n)))
    assert res.noise.shape == (3, 4, 8, 8) and res.latents.shape[0] == 3 and len(res.seed_losses) == 3
    assert calls[-1] == (12, 12) and len(calls) == 12
    d = torch.cdist(res.noise.flatten(1), res.noise.flatten(1))
    assert float(d[~torch.eye(3, dtype=torch.bool)].min()) > 1e-3  # all different


def test_contrastive_semantic_loss():
    own = torch.nn.functional.normalize(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    other = torch.tensor([[0.0, 1.0, 0.0]])
    near_own = torch.tensor([[0.9, 0.1, 0.0]])
    near_other = torch.tensor([[0.1, 0.9, 0.0]])
    plain = S.semantic_terms(near_own, own, None, 0.1)
    assert float(plain) == pytest.approx(1 - 0.9 / math.hypot(0.9, 0.1), rel=1e-5)
    assert float(S.semantic_terms(near_own, own, other, 0.1)) < float(S.semantic_terms(near_other, own, other, 0.1))


def test_contrastive_run(vision):
    model = ToySeedModel()
    refs = references_from(model, 21, toy_config())
    res = S.train_seedselect(model, vision, refs, toy_config(iterations=4), others=[references_from(model, 22, toy_config())])
    assert len(res.losses) == 4 and all(math.isfinite(v) for v in res.losses)


def test_clip_distance_is_reported_every_iteration(vision):
    """The live chart's second panel: SeedSelect's CLIP-space distance to the references per
    iteration, the same numbers as the result's semantic curve."""
    model = ToySeedModel()
    refs = references_from(model, 21, toy_config())
    points = []
    res = S.train_seedselect(model, vision, refs, toy_config(iterations=4), on_point=points.append)
    assert [p["step"] for p in points] == [1, 2, 3, 4]
    assert [p["CLIP distance"] for p in points] == pytest.approx(res.semantic)


def test_cancel_keeps_the_best_seed(vision):
    model = ToySeedModel()
    refs = references_from(model, 3, toy_config())
    kept = []

    def progress(i, n, loss, img):
        if i == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        S.train_seedselect(model, vision, refs, toy_config(iterations=10), progress=progress, on_cancel=kept.append)
    assert len(kept) == 1 and kept[0].cancelled and kept[0].noise.shape == (1, 4, 8, 8)
    assert kept[0].best_loss == min(kept[0].losses) and len(kept[0].losses) == 4


# ---- bad input: clear errors before any work ------------------------------------------------------

class _Counting(ToySeedModel):
    def run(self, sigmas, cfg, fn, shape=None):
        raise AssertionError("work started before the input was checked")

    def encode_images(self, images):
        raise AssertionError("work started before the input was checked")


@pytest.mark.parametrize("refs, kw, match", [
    (torch.zeros(0, 64, 64, 3), {}, "no references"),
    (None, {}, "no references"),
    (torch.rand(2, 64, 64), {}, r"\[B, H, W, 3\]"),
    (torch.rand(2, 64, 64, 3), {"width": 60}, "width 60 px .* multiple of 8 px"),
    (torch.rand(2, 64, 64, 3), {"height": 0}, "height 0 px"),
    (torch.rand(2, 64, 64, 3), {"sampler": "euler_ancestral"}, "not supported for seed optimisation"),
    (torch.rand(2, 64, 64, 3), {"start": "magic"}, "start must be one of"),
    (torch.rand(2, 64, 64, 3), {"iterations": 0}, "iterations must be positive"),
    (torch.rand(2, 64, 64, 3), {"sigmas": torch.tensor([1.0, 2.0, 0.0])}, "sigmas must decrease"),
])
def test_bad_input_is_refused_before_work(vision, refs, kw, match):
    with pytest.raises(ValueError, match=match):
        S.train_seedselect(_Counting(), vision, refs, toy_config(**kw))


def test_unet_downsampling_limits_the_size(vision, tiny_sd1_host):
    model = S.SeamSeedModel(tiny_sd1_host, "a photo")
    assert model.latent_multiple == 2  # the tiny UNet halves once: latents must be even
    with pytest.raises(ValueError, match="width 72 px .* multiple of 16 px.*use 64 or 80"):
        S.train_seedselect(model, vision, torch.rand(2, 64, 64, 3), toy_config(width=72))


# ---- end to end on the tiny SD1 host (diffusers adapter, UNet, VAE) -------------------------------

def test_tiny_sd1_host_end_to_end(vision, tiny_sd1_host):
    model = S.SeamSeedModel(tiny_sd1_host, "a photo of a cat", "blurry")
    cfg = S.SeedSelectConfig(width=64, height=64, steps=4, cfg=2.0, iterations=6, learning_rate=0.1,
                             lr_drop_at=100, seed=1)
    refs = references_from(model, 99, cfg)
    before = {k: v.clone() for k, v in list(tiny_sd1_host.frozen_parameters().items())[:20]}
    res = S.train_seedselect(model, vision, refs, cfg)
    assert res.best_loss < res.losses[0] * 0.98, res.losses
    again = S.render(model, res.noise, res.sigmas, cfg.sampler, cfg.cfg)
    assert torch.allclose(again, res.latents, atol=1e-4, rtol=1e-4)
    for k, v in before.items():
        assert torch.equal(v, tiny_sd1_host.frozen_parameters()[k]), f"{k} changed"


# ---- the seed bank --------------------------------------------------------------------------------

def test_seed_bank_round_trip_and_safety(tmp_path):
    from likeness.trainers import seed_bank as B

    entry = B.SeedEntry(noise=torch.randn(2, 4, 8, 8), sigmas=torch.tensor([14.6, 1.0, 0.0]), sampler="ddim",
                        cfg=7.5, prompt="a tiger_cat", model_name="sd21.safetensors", model_hash="abc123",
                        family="sd2", scheduler="ddim_uniform", steps=2, width=64, height=64, losses=[1.0, 0.5])
    path = B.save_seed(tmp_path, "tiger", entry)
    assert path.name == "tiger.seed.safetensors" and B.list_seeds(tmp_path) == ["tiger"]
    back = B.load_seed(tmp_path, "tiger")
    assert torch.equal(back.noise, entry.noise) and torch.equal(back.sigmas, entry.sigmas)
    assert (back.prompt, back.sampler, back.cfg, back.model_hash, back.steps, back.losses) == \
        ("a tiger_cat", "ddim", 7.5, "abc123", 2, [1.0, 0.5])
    with pytest.raises(FileExistsError, match="already exists"):
        B.save_seed(tmp_path, "tiger", entry)
    B.save_seed(tmp_path, "tiger", entry, overwrite=True)
    for bad in ("../evil", "a/b", "", "x.safetensors"):
        with pytest.raises(ValueError):
            B.save_seed(tmp_path, bad, entry)
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind
    (tmp_path / "junk.seed.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable seed file"):
        B.load_seed(tmp_path, "junk")


# ---- the command line -----------------------------------------------------------------------------

def test_cli_seedselect_offline(tmp_path, tiny_sd1_host, vision, capsys):
    import numpy as np
    from PIL import Image

    import tiny_models
    from likeness import cli
    from likeness.trainers import seed_bank as B

    model_dir = tiny_models.save_diffusers_folder(tiny_models.host_parts(tiny_sd1_host), tmp_path / "model")
    vision.model.save_pretrained(tmp_path / "clip_vision")
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(3):
        arr = (np.random.default_rng(i).random((72, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(refs / f"{i}.png")
    argv = ["seedselect", "--model", str(model_dir), "--references", str(refs), "--prompt", "a photo of a cat",
            "--clip-vision", str(tmp_path / "clip_vision"), "--width", "64", "--height", "64", "--steps", "2",
            "--iterations", "2", "--cfg", "2", "--device", "cpu", "--out", str(tmp_path / "out"), "--name", "cat"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    entry = B.load_seed(tmp_path / "out", "cat")
    assert entry.noise.shape == (1, 4, 8, 8) and entry.prompt == "a photo of a cat" and entry.cfg == 2.0
    assert (tmp_path / "out" / "cat.0.png").is_file()
    assert cli.main(argv) == 2 and "exists" in capsys.readouterr().err  # never overwritten unasked
    bad = argv[:argv.index("--clip-vision")] + ["--clip-vision", str(tmp_path)] + argv[argv.index("--clip-vision") + 2:]
    assert cli.main(bad + ["--overwrite"]) == 2 and "not a CLIP vision model folder" in capsys.readouterr().err
