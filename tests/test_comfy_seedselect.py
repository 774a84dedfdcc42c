"""SeedSelect inside a real ComfyUI (marker ``comfyui``; skipped without COMFYUI_PATH):
our samplers and schedules against ComfyUI's own functions, and the node's NOISE through
``SamplerCustomAdvanced`` reproducing the node's result.

    COMFYUI_PATH=~/.cache/likeness/ComfyUI python -m pytest -m comfyui tests/test_comfy_seedselect.py
"""
from __future__ import annotations

import math

import pytest
import torch

from support import comfy_runtime, tiny_clip_vision

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfy_root")]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd1(comfy_root):
    return comfy_runtime.load_tiny("sd15")


@pytest.fixture(scope="module")
def clip_vision(comfy_root, tmp_path_factory):
    """A tiny CLIP_VISION built by ComfyUI's own loader class from a tiny config, random weights
    loaded under inference mode (as Load CLIP Vision does)."""
    path = tiny_clip_vision.write_config(tmp_path_factory.mktemp("cv") / "tiny_clip_vision.json")
    return tiny_clip_vision.random_model(path)


@pytest.fixture(scope="module")
def node_classes(likeness_nodes):
    return {k: likeness_nodes[k] for k in ("LikenessSeedSelect", "LikenessLoadSeed", "LikenessNoiseFromLatent")}


def _run(node_cls, **inputs):
    clone = node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": {"UNIQUE_ID": "5"}})
    with torch.inference_mode():
        return clone.EXECUTE_NORMALIZED(**inputs)


# ---- our math against ComfyUI's functions ---------------------------------------------------------

def test_schedules_and_noise_scaling_match_comfyui(sd1):
    import comfy.samplers

    from likeness.trainers import diff_sampling as DS

    ms = sd1[0].get_model_object("model_sampling")
    train = ms.sigmas.float()
    for name in DS.SCHEDULERS:
        for steps in (1, 7, 20):
            ours = DS.make_sigmas(train, name, steps)
            theirs = comfy.samplers.calculate_sigmas(ms, name, steps).float()
            assert ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (name, steps)
            z = torch.randn(1, 4, 8, 8)
            max_denoise = comfy.samplers.Sampler().max_denoise(type("W", (), {"inner_model": sd1[0].model})(), theirs)
            ref = ms.noise_scaling(theirs[0], z, torch.zeros_like(z), max_denoise)
            assert torch.allclose(DS.initial_latent(z, ours, float(ms.sigma_max)), ref, rtol=1e-6), (name, steps)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_samplers_match_comfyuis(sampler):
    import comfy.samplers
    from comfy.k_diffusion import sampling as K

    from likeness.trainers import diff_sampling as DS

    def den(x, sigma, **kw):
        c = 1.0 / (1.0 + sigma.view(-1, 1, 1, 1) ** 2)
        return c * x + 0.3 * torch.tanh(x.roll(1, dims=-1)) * (1 - c)

    sig = torch.linspace(14.6, 0.03, 10)
    sigmas = torch.cat([sig, torch.zeros(1)])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    fn = {"euler": K.sample_euler, "ddim": comfy.samplers.sampler_object("ddim").sampler_function,
          "dpmpp_2m": K.sample_dpmpp_2m}[sampler]
    theirs = fn(den, x.clone(), sigmas, extra_args={}, disable=True)
    ours, _ = DS.sample(den, x.clone().requires_grad_(True), sigmas, sampler)
    assert torch.allclose(ours.detach(), theirs, rtol=1e-5, atol=1e-5), float((ours - theirs).abs().max())


# ---- the SeedSelect objects ------------------------------------------------------------------------

def test_seed_model_and_clip_vision_keep_the_seam(sd1, clip_vision):
    """ComfySeedModel is a ``seam.SeedModel`` whose decode is the ComfyUI host's differentiable decode;
    ComfyClipVision a ``seam.ImageEncoder`` differentiable in the pixels."""
    import nodes

    from likeness.hosts.comfy import ComfyClipVision, ComfyHost, ComfySeedModel
    from likeness.trainers.seam import ImageEncoder, SeedModel

    model, clip, vae = sd1
    with torch.inference_mode():
        (pos,) = nodes.CLIPTextEncode().encode(clip, "a photo of a tiger cat")
        seed_model, vision = ComfySeedModel(model, pos, None, vae), ComfyClipVision(clip_vision)
        host = ComfyHost(model, clip, vae)
    assert isinstance(seed_model, SeedModel) and isinstance(vision, ImageEncoder)
    assert seed_model.latent_multiple == host.latent_multiple and seed_model.family == "sd1"
    sig = seed_model.training_sigmas()
    assert sig.device.type == "cpu" and torch.equal(sig, host.training_sigmas().cpu())
    with torch.inference_mode(), host.training():
        lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        img = seed_model.decode(lat)
        assert torch.equal(img, host.decode_latents(lat, differentiable=True))
        emb = vision.embed(img)
        emb.sum().backward()
    assert emb.shape == (1, 16) and lat.grad is not None and float(lat.grad.norm()) > 0


# ---- the node ---------------------------------------------------------------------------------------

def _inputs(sd1, cv, **kw):
    import nodes

    model, clip, vae = sd1
    with torch.inference_mode():
        (pos,) = nodes.CLIPTextEncode().encode(clip, "a photo of a tiger cat")
        (neg,) = nodes.CLIPTextEncode().encode(clip, "blurry")
    base = dict(model=model, positive=pos, negative=neg, vae=vae, clip_vision=cv,
                references=torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0)),
                width=64, height=64, sampler="ddim", scheduler="ddim_uniform", steps=3, cfg=3.0, iterations=3,
                learning_rate=0.1, seed=7, num_seeds=1, start="seed", candidates=2, optimise_without_cfg=False,
                target_loss=0.0, bootstrap_iterations=2, save_as="", overwrite=False)
    base.update(kw)
    return base


def _sample_custom_advanced(model, pos, neg, cfg, sampler_name, sigmas, noise, width, height, batch=1):
    import nodes
    from comfy_extras import nodes_custom_sampler as NCS

    with torch.inference_mode():
        (latent,) = nodes.EmptyLatentImage().generate(width, height, batch)
        guider = NCS.CFGGuider.execute(model, pos, neg, cfg).result[0]
        sampler = NCS.KSamplerSelect.execute(sampler_name).result[0]
        out = NCS.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).result
    return out[0]["samples"]


@pytest.mark.parametrize("sampler, scheduler, cfg", [("ddim", "ddim_uniform", 3.0), ("euler", "normal", 1.0),
                                                     ("dpmpp_2m", "karras", 2.0)])
def test_noise_reproduces_the_result_in_sampler_custom_advanced(node_classes, sd1, clip_vision, sampler,
                                                                 scheduler, cfg, tmp_path, monkeypatch):
    import comfy.samplers
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "likeness_seeds", ([str(tmp_path)], {".safetensors"}))
    args = _inputs(sd1, clip_vision, sampler=sampler, scheduler=scheduler, cfg=cfg, save_as="tiger")
    out = _run(node_classes["LikenessSeedSelect"], **args)
    noise, noise_latent, samples, preview, loss = out.result
    assert len(loss["loss"]) == 3 and all(math.isfinite(v) for v in loss["loss"])
    assert preview.shape == (1, 64, 64, 3) and noise_latent["samples"].shape == (1, 4, 8, 8)
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(sd1[0].get_model_object("model_sampling"), scheduler, 3)
    got = _sample_custom_advanced(sd1[0], args["positive"], args["negative"], cfg, sampler, sigmas, noise, 64, 64)
    want = samples["samples"]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), \
        float((got - want).abs().max())
    # ... and so does the saved seed, through Load Seed
    assert (tmp_path / "tiger.seed.safetensors").is_file()
    noise2, sigmas2, info = _run(node_classes["LikenessLoadSeed"], name="tiger").result
    assert torch.equal(sigmas2, sigmas.float()) and sampler in info
    got2 = _sample_custom_advanced(sd1[0], args["positive"], args["negative"], cfg, sampler, sigmas2, noise2, 64, 64)
    assert torch.allclose(got2, got)
    noise3 = _run(node_classes["LikenessNoiseFromLatent"], noise_latent=noise_latent).result[0]
    assert torch.equal(noise3.generate_noise({"samples": torch.zeros(1, 4, 8, 8)}), noise.noise)


def test_bootstrap_seeds_and_a_wrong_latent(node_classes, sd1, clip_vision, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "likeness_seeds", ([str(tmp_path)], {".safetensors"}))
    args = _inputs(sd1, clip_vision, num_seeds=2, iterations=2, start="best_of")
    noise, _, samples, preview, _ = _run(node_classes["LikenessSeedSelect"], **args).result
    assert noise.noise.shape == (2, 4, 8, 8) and samples["samples"].shape == (2, 4, 8, 8) and preview.shape[0] == 2
    with pytest.raises(ValueError, match="Empty Latent Image of the size"):
        noise.generate_noise({"samples": torch.zeros(1, 4, 16, 16)})


def test_bad_input_is_refused_before_work(node_classes, sd1, clip_vision, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "likeness_seeds", ([str(tmp_path)], {".safetensors"}))
    node = node_classes["LikenessSeedSelect"]
    with pytest.raises(ValueError, match="no references"):
        _run(node, **_inputs(sd1, clip_vision, references=torch.zeros(0, 64, 64, 3)))
    with pytest.raises(ValueError, match="width 60 px"):
        _run(node, **_inputs(sd1, clip_vision, width=60))
    with pytest.raises(ValueError):
        _run(node, **_inputs(sd1, clip_vision, save_as="../escape"))
    assert not list(tmp_path.iterdir())


def test_cancel_then_resume_is_bit_identical(node_classes, sd1, clip_vision, tmp_path, monkeypatch):
    """The node's Cancel keeps the best seed and a run state; ``resume: latest`` then ends with the
    very noise, result and loss curve of the run never cancelled (issue 15)."""
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "likeness_seeds", ([str(tmp_path)], {".safetensors"}))
    node = node_classes["LikenessSeedSelect"]
    kw = dict(iterations=4, num_seeds=2, bootstrap_iterations=2)
    whole = _run(node, **_inputs(sd1, clip_vision, save_as="whole", **kw)).result
    real = comfy.utils.ProgressBar.update_absolute

    def cancel_at_3(self, value, total=None, preview=None):
        real(self, value, total, preview)
        if value == 3:
            mm.interrupt_current_processing()  # the user presses Cancel: the next progress call raises

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", cancel_at_3)
    with pytest.raises(mm.InterruptProcessingException):
        _run(node, **_inputs(sd1, clip_vision, save_as="stopped", **kw))
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", real)
    assert (tmp_path / "stopped.seed.safetensors").is_file()  # the best seed so far
    assert (tmp_path / "stopped.step00000003.likeness-state").is_file()
    out = _run(node, **_inputs(sd1, clip_vision, save_as="stopped", resume="latest", **kw))
    noise, _, samples, _, loss = out.result
    assert torch.equal(noise.noise, whole[0].noise) and torch.equal(samples["samples"], whole[2]["samples"])
    assert loss == whole[4]
    assert "continued after iteration 3" in out.ui["text"][0]
