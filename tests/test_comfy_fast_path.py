"""ComfyHost's fast path (``hosts/comfy/fast.py``) against its low-memory path, inside a real ComfyUI
on the tiny SD1 / SD2 / SDXL checkpoints (marker ``comfyui``; skipped without ``COMFYUI_PATH``).

What a user relies on: the default path trains exactly what the wrapper path trains (loss and
gradients, for Textual Inversion and for weight patches), allocates no weight-sized tensor per step,
loads the model once per ``training()`` block, builds a reused conditioning once, and leaves the
MODEL/CLIP it was given, and everything sharing their weights, as it found them.

    COMFYUI_PATH=~/.cache/likeness/ComfyUI python -m pytest -m comfyui tests/test_comfy_fast_path.py
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from support import comfy_runtime
from support.allocations import WeightSized

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfy_root")]

PH = "lkxqz"
PROMPTS = [f"a photo of {PH}", f"{PH} on a beach, painting"]
ARCHS = ["sd15", "sd2", pytest.param("sdxl", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def loaded(comfy_root):
    """(MODEL, CLIP, VAE) per arch, loaded on first use and kept for the module."""
    got = {}

    def get(arch):
        if arch not in got:
            got[arch] = comfy_runtime.load_tiny(arch)
        return got[arch]

    return get


def _host(objs, path="fast"):
    from likeness.hosts.comfy import ComfyHost

    with torch.inference_mode():  # as a node builds it
        return ComfyHost(*objs, path=path)


def _batch(host, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(PROMPTS)
    x0 = torch.randn(b, host.latent_channels, 8, 8, generator=g)
    sigma = host.training_sigmas()[torch.tensor([40, 600][:b])]
    return x0, x0 + torch.randn(x0.shape, generator=g) * sigma.view(-1, 1, 1, 1), sigma


def _loss(host, vectors, x0, x, sigma):
    from likeness.trainers import objective

    cond = host.encode_text(PROMPTS, PH, vectors)
    return objective.native_error(host, host.denoise(x, sigma, cond), x0, sigma).mean()


def _ti_step(host, seed=0):
    """(loss, {encoder: grad of its vectors}) of one Textual Inversion step."""
    with torch.inference_mode(), host.training():
        vec = {k: (v + 0.1).requires_grad_(True) for k, v in host.token_embeddings("red apple").items()}
        x0, x, sigma = _batch(host, seed)
        loss = _loss(host, vec, x0, x, sigma)
        loss.backward()
    return loss.detach(), {k: v.grad for k, v in vec.items()}


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= rel * float(b.abs().max()) + 1e-12


@pytest.mark.parametrize("arch", ARCHS)
def test_ti_loss_and_gradients_equal_the_low_memory_path(loaded, arch):
    objs = loaded(arch)
    fast_loss, fast_grads = _ti_step(_host(objs, "fast"))
    slow_loss, slow_grads = _ti_step(_host(objs, "low_memory"))
    assert _close(fast_loss, slow_loss), (float(fast_loss), float(slow_loss))
    assert set(fast_grads) == set(slow_grads)
    for key in slow_grads:
        assert float(slow_grads[key].abs().max()) > 0, key
        assert _close(fast_grads[key], slow_grads[key]), key


def _patch_names(host) -> list[str]:
    return [n for n in host.tunable_parameters("unet") if n.endswith(("attn2.to_k.weight", "ff.net.2.bias"))][:2]


def _patched_step(host):
    """(loss, grads) of one step through a LoRA-style patch and a full-fine-tune delta."""
    with torch.inference_mode(), host.training():
        weights = host.tunable_parameters("unet")
        g = torch.Generator().manual_seed(5)
        params, fns = {}, {}
        for n in _patch_names(host):
            w = weights[n]
            if w.ndim == 2:  # LoRA: w + up @ down
                down = (0.05 * torch.randn(2, w.shape[1], generator=g)).requires_grad_(True)
                up = (0.05 * torch.randn(w.shape[0], 2, generator=g)).requires_grad_(True)
                params[n + ":down"], params[n + ":up"] = down, up
                fns[n] = lambda t, d=down, u=up: t + (u @ d).to(t.dtype)
            else:  # full fine-tune: w + delta
                delta = (0.05 * torch.randn(w.shape, generator=g)).requires_grad_(True)
                params[n] = delta
                fns[n] = lambda t, d=delta: t + d.to(t.dtype)
        x0, x, sigma = _batch(host, 1)
        with host.parameter_patches(fns):
            loss = _loss(host, None, x0, x, sigma)
            loss.backward()
    return loss.detach(), {k: p.grad for k, p in params.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_loss_and_gradients_equal_the_low_memory_path(loaded, arch):
    objs = loaded(arch)
    fast_loss, fast_grads = _patched_step(_host(objs, "fast"))
    slow_loss, slow_grads = _patched_step(_host(objs, "low_memory"))
    assert len(slow_grads) == 3  # a LoRA (down, up) and a bias delta
    assert _close(fast_loss, slow_loss), (float(fast_loss), float(slow_loss))
    for key, g in slow_grads.items():
        assert g is not None and float(g.abs().max()) > 0, key
        assert _close(fast_grads[key], g), key


def test_text_encoder_patch_is_what_comfyui_applies(loaded):
    """A patched text-encoder weight conditions as ComfyUI's own weight patch of it does."""
    objs = loaded("sd15")
    host, clip = _host(objs), objs[1]
    name = [n for n in host.tunable_parameters("clip_l") if n.endswith("layers.0.mlp.fc1.weight")][0]
    with torch.inference_mode():
        delta = 0.01 * clip.cond_stage_model.state_dict()[name]
        patched = clip.clone()
        patched.add_patches({name: (delta,)}, 1.0)
        own = patched.encode_from_tokens(patched.tokenize("a photo of a cat"), return_dict=True)["cond"]
    with torch.inference_mode(), host.training(), torch.no_grad():
        plain = host.encode_text(["a photo of a cat"]).cross_attn[0]
        with host.parameter_patches({name: lambda w: w + delta.to(w)}):
            ours = host.encode_text(["a photo of a cat"]).cross_attn[0]
    assert float((plain - own).abs().max()) > 1e-2  # the patch matters
    torch.testing.assert_close(ours.detach(), own.detach(), atol=1e-4, rtol=1e-4)


def _weight_sized_per_step(host) -> list[str]:
    """Weight-shaped tensors made by TI steps 2 and 3 (step 1 may build what the run keeps)."""
    with torch.inference_mode(), host.training():
        shapes = {tuple(t.shape) for part in ("unet", *(e.key for e in host.text_encoders()))
                  for t in host.tunable_parameters(part).values() if t.numel() >= 4096}
        vec = {k: v.requires_grad_(True) for k, v in host.token_embeddings("red apple").items()}
        x0, x, sigma = _batch(host)
        _loss(host, vec, x0, x, sigma).backward()
        with WeightSized(shapes) as counter:
            for _ in range(2):
                _loss(host, vec, x0, x, sigma).backward()
    return counter.hits


def test_no_weight_sized_tensor_is_allocated_per_step(loaded):
    objs = loaded("sd15")
    assert _weight_sized_per_step(_host(objs, "fast")) == []
    # the counter sees what the low-memory path copies on every forward
    assert len(_weight_sized_per_step(_host(objs, "low_memory"))) > 100


def test_model_loaded_once_and_reused_conditioning_built_once(loaded, monkeypatch):
    import comfy.model_management

    objs = loaded("sd15")
    host = _host(objs)
    loads, conds = [], []
    real_load = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    base = objs[0].model
    real_conds = base.extra_conds
    monkeypatch.setattr(base, "extra_conds", lambda **k: conds.append(1) or real_conds(**k))
    with torch.inference_mode(), host.training(), torch.no_grad():
        x0, x, sigma = _batch(host)
        cond = host.encode_text(["a photo", "a cat"])
        outs = [host.denoise(x, sigma, cond) for _ in range(3)]
        host.encode_text(["a dog", "a dog"])
    assert len(loads) == 1 and len(conds) == 2  # one load per block; one build per prompt
    assert all(torch.equal(o, outs[0]) for o in outs)
    with torch.inference_mode(), host.training(), torch.no_grad():
        host.denoise(x, sigma, host.encode_text(["a photo", "a cat"]))
    assert len(loads) == 2  # a new block loads again (the model may have moved in between)


def _fingerprint(module) -> dict[str, tuple]:
    out = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = (id(t), t.dtype, hashlib.sha1(data).hexdigest())
    return out


def _state(objs) -> tuple:
    model, clip, _ = objs
    patchers = [model, clip.patcher]
    return (_fingerprint(model.model), _fingerprint(clip.cond_stage_model),
            [(dict(p.weight_wrapper_patches), dict(p.object_patches), dict(p.model_options)) for p in patchers],
            {n: (dict(m._forward_hooks), type(m)) for n, m in model.model.named_modules()})


def test_inputs_and_shared_weights_untouched(loaded):
    """A fast block with patches, hooks and gradient checkpointing leaves the user's MODEL/CLIP
    (and so every clone sharing their modules) as it found them, and computing what it did."""
    objs = loaded("sd15")
    before = _state(objs)
    probe = _host(objs, "low_memory")
    with torch.inference_mode(), probe.training(), torch.no_grad():
        x0, x, sigma = _batch(probe)
        plain = probe.denoise(x, sigma, probe.encode_text(["a photo", "a cat"]))
    host = _host(objs)
    with torch.inference_mode(), host.training():
        name = _patch_names(host)[0]
        layer = host._part_root("unet")[0].get_submodule(name.rsplit(".", 1)[0])
        layer.register_forward_hook(lambda m, i, o: o * 1.5)  # what a LoRA branch does
        with host.parameter_patches({name: lambda w: w * 2}), host.gradient_checkpointing():
            vec = {k: v.requires_grad_(True) for k, v in host.token_embeddings("cat").items()}
            _loss(host, vec, x0, x, sigma).backward()
    assert _state(objs) == before
    with torch.inference_mode(), probe.training(), torch.no_grad():
        assert torch.equal(probe.denoise(x, sigma, probe.encode_text(["a photo", "a cat"])), plain)


def test_path_choice_and_memory_estimate(loaded):
    objs = loaded("sd15")
    with pytest.raises(ValueError, match="low_memory"):
        _host(objs, "fastest")
    host = _host(objs)
    mem = host.fast_path_memory()
    unet = sum(t.numel() * 4 for t in host.tunable_parameters("unet").values())
    text = host.tunable_parameters("clip_l").values()
    assert mem.resident > unet > 0  # UNet and text encoder, counted at fp32 (CPU)
    # ComfyUI loads the UNet in fp32 on CPU (aliased, no copy) and the text encoder in fp16, which
    # it computes in fp32: the one copy the fast path may make is that cast, for trained text
    assert {t.dtype for t in text} == {torch.float16}
    assert sum(t.numel() * 4 for t in text) <= mem.copied == mem.resident - unet
    with torch.inference_mode(), host.training(), torch.no_grad():
        host.path = "low_memory"  # before the first step: still free to choose
        host.path = "fast"
        host.denoise(*_batch(host)[1:], host.encode_text(["a cat", "a dog"]))
        with pytest.raises(RuntimeError, match="before"):
            host.path = "low_memory"
    host.path = "low_memory"  # after the block: fine again


def test_the_path_is_chosen_before_training_from_the_estimate_and_the_budget(loaded):
    """The fast path's one-time copies may take half the memory budget: beyond that the host trains
    on the low-memory path and says why, and the result is the same training step."""
    from likeness.trainers.preflight import GiB

    objs = loaded("sd15")
    host = _host(objs)
    copied = host.fast_path_memory().copied
    assert copied > 0  # the fp16 text encoder's fp32 cast (see test_path_choice_and_memory_estimate)
    assert host.choose_path() == "" and host.path == "fast"  # the CPU: no budget known
    assert host.choose_path(budget_gb=3 * copied / GiB) == "" and host.path == "fast"
    note = host.choose_path(budget_gb=1.5 * copied / GiB)
    assert host.path == "low_memory" and "low-memory path" in note and "GB free" in note
    loss, grads = _ti_step(host)
    ref_loss, ref_grads = _ti_step(_host(objs, "fast"))
    assert _close(loss, ref_loss) and all(_close(grads[k], ref_grads[k]) for k in ref_grads)
