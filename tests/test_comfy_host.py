"""ComfyHost inside a real ComfyUI (``COMFYUI_PATH``), on tiny random SD1.x / SD2.x / SDXL checkpoints
loaded by ComfyUI's own CheckpointLoaderSimple under ``torch.inference_mode()``, as a node sees them.

    COMFYUI_PATH=~/.cache/likeness/ComfyUI python -m pytest tests/test_comfy_host.py -q

Skipped when COMFYUI_PATH is unset (CI).  The first run builds the checkpoints (tests/support/tiny_checkpoints.py).
"""
from __future__ import annotations

import copy
import hashlib
import math
import types

import pytest
import torch

from support import comfy_runtime, tiny_checkpoints

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfy_root")]

PH = "lkxqz"  # a placeholder that is no single vocabulary token


def _load(arch):
    return comfy_runtime.load_tiny(arch)


@pytest.fixture(scope="module")
def sd1(comfy_root):
    return _load("sd15")


@pytest.fixture(scope="module")
def sd2(comfy_root):
    return _load("sd2")


@pytest.fixture(scope="module")
def sdxl(comfy_root):
    return _load("sdxl")


def _host(objs, model=None):
    from likeness.hosts.comfy import ComfyHost

    m, c, v = objs
    with torch.inference_mode():  # constructed inside a node
        return ComfyHost(model or m, c, v)


def _fingerprint(module) -> dict[str, tuple]:
    """Bit-exact identity of every parameter and buffer: object, storage and content hash."""
    out = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = (id(t), t.dtype, t.requires_grad, hashlib.sha1(data).hexdigest())
    return out


def _patcher_state(p) -> tuple:
    return (dict(p.weight_wrapper_patches), {k: list(v) for k, v in p.patches.items()}, dict(p.object_patches))


def _train_step(host, vectors, prompts, meta=None, res=64, seed=0):
    """One TI loss + backward, as the trainer does it; returns (loss, cond, x)."""
    g = torch.Generator().manual_seed(seed)
    with host.training():
        img = torch.rand(len(prompts), res, res, 3, generator=g)
        x0 = host.encode_images(img)
        sig = host.training_sigmas()[torch.randint(0, 1000, (len(prompts),), generator=g)]
        x = x0 + torch.randn(x0.shape, generator=g) * sig.view(-1, 1, 1, 1)
        cond = host.encode_text(prompts, PH, vectors, meta)
        den = host.denoise(x, sig, cond)
        loss = (((den - x0) / host.output_scale(sig).view(-1, 1, 1, 1)) ** 2).mean()
        loss.backward()
    return loss.detach(), cond, x


def _trainable(host, text="cat"):
    with host.training():
        return {k: v.clone().requires_grad_(True) for k, v in host.token_embeddings(text).items()}


# ---------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("arch,family,keys", [
    ("sd15", "sd1", {"clip_l": 768}), ("sd2", "sd2", {"clip_h": 1024}),
    pytest.param("sdxl", "sdxl", {"clip_l": 768, "clip_g": 1280}, marks=pytest.mark.slow)])
def test_info_and_encoders(request, arch, family, keys):
    """What the contract cannot know: the real encoder widths, the checkpoint's file name, and that
    what the host returns to a node running under inference mode is an ordinary tensor."""
    objs = request.getfixturevalue({"sd15": "sd1", "sd2": "sd2", "sdxl": "sdxl"}[arch])
    host = _host(objs)
    assert host.info.family == family and host.info.prediction == "eps"
    assert host.info.name == tiny_checkpoints.CHECKPOINTS[arch] and host.info.hash is None
    assert {e.key: e.width for e in host.text_encoders()} == keys
    assert [e.key for e in host.text_encoders()] == list(keys)  # file order
    assert host.latent_multiple == 2 ** (len(objs[0].model.model_config.unet_config["channel_mult"]) - 1)
    for part in ["unet", *keys]:
        assert all(n.endswith((".weight", ".bias")) for n in host.tunable_parameters(part)), part
    if host.device.type == "cpu":
        assert host.compute_dtype == torch.float32
    assert not host.training_sigmas().is_inference()
    emb = host.token_embeddings("tabby cat")
    assert {k: tuple(v.shape) for k, v in emb.items()} == {k: (2, w) for k, w in keys.items()}
    assert all(v.dtype == torch.float32 and not v.is_inference() for v in emb.values())


def test_v_prediction_and_output_scale(sd1):
    eps = _host(sd1)
    v = _host(sd1, model=comfy_runtime.v_prediction(sd1[0]))
    assert v.info.prediction == "v"
    s = torch.tensor([0.03, 1.0, 14.6])
    assert torch.allclose(eps.output_scale(s), -s)
    assert torch.allclose(v.output_scale(s), -s / torch.sqrt(s ** 2 + 1))
    assert eps.output_scale(torch.tensor([2.0])).shape == (1,)


def test_unsupported_models_are_refused(sd1):
    import comfy.model_base
    import comfy.model_sampling
    from likeness.hosts.comfy import ComfyHost

    flux = types.SimpleNamespace(model=comfy.model_base.Flux.__new__(comfy.model_base.Flux))
    with pytest.raises(ValueError, match=r"supports SD1\.x, SD2\.x and SDXL; this MODEL is Flux"):
        ComfyHost(flux, sd1[1], sd1[2])

    class EDM(comfy.model_sampling.ModelSamplingContinuousEDM, comfy.model_sampling.EDM):
        pass

    with torch.inference_mode():
        m = sd1[0].clone()
        m.add_object_patch("model_sampling", EDM(m.model.model_config))
    with pytest.raises(ValueError, match="discrete noise schedule"):
        ComfyHost(m, sd1[1], sd1[2])
    with pytest.raises(ValueError, match="needs both the MODEL and the CLIP"):
        ComfyHost(sd1[0], None, sd1[2])


def test_clip_of_another_family_is_refused(sd1, sd2):
    from likeness.hosts.comfy import ComfyHost

    with pytest.raises(ValueError, match="no clip_h text encoder"):
        ComfyHost(sd2[0], sd1[1], sd2[2])


def test_check_placeholder(sd1):
    host = _host(sd1)
    host.check_placeholder(PH)
    host.check_placeholder("<my-cat>")
    with pytest.raises(ValueError, match="already a word"):
        host.check_placeholder("cat")
    with pytest.raises(ValueError, match="already a word"):
        host.check_placeholder("Dog")  # CLIP lower-cases
    with pytest.raises(ValueError, match="whitespace"):
        host.check_placeholder("my cat")
    with pytest.raises(ValueError, match="empty"):
        host.check_placeholder(" ")


# ---------------------------------------------------------------------------------------- images
def test_encode_decode_images(sd1):
    model, _, vae = sd1
    host = _host(sd1)
    img = torch.rand(2, 64, 48, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # as a node calls it; results must still be ordinary tensors
        lat = host.encode_images(img)
        ref = vae.encode(img) * 0.18215
        out = host.decode_latents(lat)
    assert lat.shape == (2, 4, 8, 6) and lat.dtype == torch.float32 and not lat.is_inference()
    assert torch.allclose(lat.cpu(), ref, atol=1e-6)
    assert out.shape == (2, 64, 48, 3) and out.device.type == "cpu" and not out.is_inference()
    with pytest.raises(ValueError, match="multiple of 8"):
        host.encode_images(torch.rand(1, 60, 64, 3))


# ---------------------------------------------------------------------------------------- text
def _cte(clip, text):
    import nodes

    with torch.inference_mode():
        (cond,) = nodes.CLIPTextEncode().encode(clip, text)
    return cond[0][0], cond[0][1]["pooled_output"]


@pytest.mark.parametrize("arch", ["sd1", "sd2", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_spliced_word_equals_clip_text_encode(request, arch):
    objs = request.getfixturevalue(arch)
    host = _host(objs)
    words = "tabby cat" if arch == "sd1" else "cat"  # SD1 also checks a 2-vector splice (re-padding)
    with torch.inference_mode():
        with host.training(), torch.no_grad():
            vec = host.token_embeddings(words)
            cond = host.encode_text([f"a photo of {PH}, on a table"], PH, vec)
    ref, ref_pooled = _cte(objs[1], f"a photo of {words}, on a table")
    got = cond.cross_attn[0].cpu()
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5), float((got - ref).abs().max())
    assert torch.allclose(cond.pooled[0].cpu(), ref_pooled, atol=1e-5)


def test_encode_text_differentiable_sd1_and_inputs_untouched(sd1):
    import comfy.clip_model
    import comfy.model_management

    model, clip, vae = sd1
    forward = comfy.clip_model.CLIPLayer.forward
    # the inputs as ComfyUI holds them loaded: a clone an earlier test left loaded may still have its
    # patches written into the shared weights, which loading these objects puts back
    comfy.model_management.load_models_gpu([model, clip.patcher])
    before = (_fingerprint(model.model), _fingerprint(clip.cond_stage_model), _patcher_state(model),
              _patcher_state(clip.patcher))
    tok = clip.tokenizer
    host = _host(sd1)
    vec = _trainable(host, "tabby cat")
    loss, cond, x = _train_step(host, vec, [f"a photo of {PH}", f"{PH} on a beach, painting"])
    assert math.isfinite(float(loss))
    g = vec["clip_l"].grad
    assert g is not None and g.shape == (2, 768) and bool(torch.isfinite(g).all()) and float(g.norm()) > 0
    assert bool((g.norm(dim=1) > 0).all())  # both vectors reached
    # the inputs: same weights bit for bit, same patches, same tokenizer, CLIPLayer restored
    after = (_fingerprint(model.model), _fingerprint(clip.cond_stage_model), _patcher_state(model),
             _patcher_state(clip.patcher))
    assert after == before
    assert clip.tokenizer is tok and "_try_get_embedding" not in vars(tok.clip_l)
    assert comfy.clip_model.CLIPLayer.forward is forward
    kw = host.model_kwargs(cond, x)
    assert set(kw) == {"c_crossattn"} and kw["c_crossattn"].shape == (2, 77, 768)


@pytest.mark.slow
def test_sdxl_train_step(sdxl):
    """SDXL in one go (it is slow on CPU): grads reach clip_l and clip_g, the denoiser gets y of
    width 2816 built by ComfyUI from pooled clip_g + size conditioning, inputs stay untouched."""
    from likeness.trainers.seam import ImageMeta

    model, clip, vae = sdxl
    before = (_fingerprint(model.model), _fingerprint(clip.cond_stage_model), _patcher_state(model))
    host = _host(sdxl)
    vec = _trainable(host)
    meta = [ImageMeta((96, 80), (16, 8), (64, 64))]
    loss, cond, x = _train_step(host, vec, [f"a photo of {PH}"], meta)
    assert math.isfinite(float(loss))
    for key, width in (("clip_l", 768), ("clip_g", 1280)):
        g = vec[key].grad
        assert g is not None and g.shape == (1, width) and float(g.norm()) > 0, key
    kw = host.model_kwargs(cond, x)
    assert kw["c_crossattn"].shape == (1, 77, 2048)
    assert kw["y"].shape == (1, 2816)
    assert torch.allclose(kw["y"][:, :1280], cond.pooled[0])
    # the size part is what SDXL.encode_adm makes of meta (height, width, crop_h, crop_w, target h/w)
    ref = model.model.encode_adm(pooled_output=cond.pooled[0].detach(), width=80, height=96, crop_w=8, crop_h=16,
                                 target_width=64, target_height=64, device=x.device)
    assert torch.allclose(kw["y"].detach(), ref)
    # without meta: the latent's own size, as ComfyUI's samplers default it
    plain = type(cond)(cond.cross_attn, cond.pooled, [{}], cond.extra)
    dflt = model.model.encode_adm(pooled_output=cond.pooled[0].detach(), width=64, height=64, device=x.device)
    assert torch.allclose(host.model_kwargs(plain, x)["y"].detach(), dflt)
    after = (_fingerprint(model.model), _fingerprint(clip.cond_stage_model), _patcher_state(model))
    assert after == before


@pytest.mark.parametrize("prediction", ["v"])  # eps: tests/host_contract.py
def test_native_loss_identity(sd1, prediction):
    """((x0_hat - x0) / output_scale)^2 from the host equals the MSE of the raw UNet output against
    the model's own target (eps: the noise; v: (noise - sigma*x0) / sqrt(sigma^2 + 1))."""
    model = sd1[0] if prediction == "eps" else comfy_runtime.v_prediction(sd1[0])
    host = _host(sd1, model=model)
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode(), host.training(), torch.no_grad():
        cond = host.encode_text(["a photo of a cat"])
        x0 = torch.randn(2, 4, 8, 8, generator=g) * 0.8
        noise = torch.randn(2, 4, 8, 8, generator=g)
        sig = host.training_sigmas()[torch.tensor([50, 700])]
        s = sig.view(-1, 1, 1, 1)
        x = x0 + noise * s
        native = (((host.denoise(x, sig, cond) - x0) / host.output_scale(sig).view(-1, 1, 1, 1)) ** 2).mean()
        # the raw network, called directly: c_in, timestep, context
        ms = host.model_sampling
        unet = model.model.diffusion_model
        out = unet(x / torch.sqrt(s ** 2 + 1), ms.timestep(sig).float(),
                   context=cond.cross_attn[0].repeat(2, 1, 1)).float()
        target = noise if prediction == "eps" else (noise - s * x0) / torch.sqrt(s ** 2 + 1)
        direct = ((out - target) ** 2).mean()
    assert torch.allclose(native, direct, rtol=1e-4), (float(native), float(direct))


def test_batch_with_prompts_of_different_lengths(sd1):
    host = _host(sd1)
    long = ", ".join(["a very detailed photograph of a small red house"] * 9)  # > 75 tokens: 2 chunks
    with torch.inference_mode(), host.training(), torch.no_grad():
        cond = host.encode_text([f"a photo of {PH}", f"{PH} {long}"], PH, host.token_embeddings("cat"))
        x = torch.zeros(2, 4, 8, 8)
        kw = host.model_kwargs(cond, x)
        den = host.denoise(x, torch.tensor([1.0, 2.0]), cond)
    assert [c.shape[1] for c in cond.cross_attn] == [77, 154]
    assert kw["c_crossattn"].shape == (2, 154, 768)  # ComfyUI repeats the short one (no effect on attention)
    assert den.shape == x.shape and bool(torch.isfinite(den).all())


def test_trainable_vectors_need_training_context(sd1):
    host = _host(sd1)
    vec = _trainable(host)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="host.training"):
            host.encode_text([f"a photo of {PH}"], PH, vec)
    with pytest.raises(ValueError, match=r"must be \[n, 768\]"):
        host.encode_text([PH], PH, {"clip_l": torch.zeros(2, 1024)})


def test_trained_embedding_file_reproduces_training_conditioning(sd1, tmp_path):
    """The real trainer through ComfyHost, as a node runs it; then ComfyUI's own
    CLIPTextEncode of '... embedding:NAME ...' (reading the file just written) gives exactly the
    conditioning the vectors were trained with."""
    from likeness.trainers import data as D
    from likeness.trainers.textual_inversion import TIConfig, train_textual_inversion

    model, clip, vae = sd1
    before = _fingerprint(clip.cond_stage_model)
    images = D.images_from_batch(torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0)))
    cfg = TIConfig(name=PH, output_dir=tmp_path, steps=2, batch_size=2, learning_rate=5e-2, num_vectors=2,
                   save_every=0, preview_every=2, preview_steps=2)
    seen = []
    with torch.inference_mode():  # ComfyUI's executor
        host = _host(sd1)
        with host.training():
            res = train_textual_inversion(host, images, cfg, progress=lambda *a: seen.append(a))
    assert res.steps_done == 2 and all(math.isfinite(x) for x in res.losses)
    assert [a[0] for a in seen] == [1, 2] and seen[-1][3] is not None  # preview image at step 2
    assert (tmp_path / f"{PH}.safetensors").is_file()
    assert _fingerprint(clip.cond_stage_model) == before

    c2 = clip.clone()  # a CLIP whose tokenizer looks in tmp_path for embeddings
    c2.tokenizer = copy.copy(clip.tokenizer)
    c2.tokenizer.clip_l = copy.copy(clip.tokenizer.clip_l)
    c2.tokenizer.clip_l.embedding_directory = [str(tmp_path)]
    ref, ref_pooled = _cte(c2, f"a photo of embedding:{PH} in the snow")
    with torch.inference_mode(), host.training(), torch.no_grad():
        cond = host.encode_text([f"a photo of {PH} in the snow"], PH, res.vectors)
    assert torch.allclose(cond.cross_attn[0].cpu(), ref, atol=1e-5)
    assert torch.allclose(cond.pooled[0].cpu(), ref_pooled, atol=1e-5)
