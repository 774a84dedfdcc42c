"""DreamBooth contracts: LoRA maths and targets, files every loader maps, the host untouched, full
fine-tune checkpoints that reload, pivotal tuning, Min-SNR, Cancel, and clear errors before any
work.  Learning itself is shown in test_dreambooth_recovery.py (on the briefly trained model)."""
from __future__ import annotations

import contextlib

import pytest
import safetensors.torch
import torch

from likeness.hosts.diffusers import DiffusersHost
from likeness.trainers import data as D
from likeness.trainers import loop
from likeness.trainers.formats import kohya_lora, layer_names
from likeness.trainers.dreambooth import DreamBoothConfig, prepare, train_dreambooth
from likeness.trainers.objective import min_snr_weights
from likeness.trainers.lora import LoraSet, extract_lora, target_weights

import tiny_models
from oracles import a1111_lora, architectures, comfy_lora


def images(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return D.images_from_batch(torch.rand(n, size, size, 3, generator=g))


def cfg_for(tmp_path, **kw):
    base = dict(name="subject", output_dir=tmp_path / "loras", instance_prompt="a photo of sks_lk dog",
                steps=3, save_every=0, preview_every=0, seed=0)
    base.update(kw)
    return DreamBoothConfig(**base)


def snapshot(host):
    return {k: v.clone() for k, v in host.frozen_parameters().items()}


def assert_unchanged(host, before):
    after = host.frozen_parameters()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"training changed the host's weights: {changed[:3]}"


# ------------------------------------------------------------------------------------- LoRA maths

def test_adapter_delta_is_the_loaders_delta():
    w = torch.zeros(6, 5)
    s = LoraSet({"unet.x.weight": w}, rank=3, alpha=1.5, device=torch.device("cpu"), seed=1)
    a = s.adapters["unet.x.weight"]
    with torch.no_grad():
        a.up.normal_()
    assert torch.allclose(a.delta(), kohya_lora.weight_delta(a.down, a.up, 1.5), atol=1e-6)
    assert torch.equal(a.patch(w), w + a.delta())


def test_lora_starts_at_the_base_model(tiny_sd1_host):
    host = tiny_sd1_host
    params = host.tunable_parameters("unet")
    s = LoraSet({n: params[n] for n in target_weights(params, "transformer")}, 4, 4.0, device=host.device)
    x, sig = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 5.0])
    cond = host.encode_text(["a dog", "a cat"])
    with torch.no_grad():
        ref = host.denoise(x, sig, cond)
        with host.parameter_patches(s.patches()):
            out = host.denoise(x, sig, cond)
    assert torch.equal(ref, out)


def test_patched_forward_equals_merged_weights(tiny_sd1_host):
    """What we train is what a loader computes after merging the LoRA into the weights."""
    host = tiny_sd1_host
    params = host.tunable_parameters("unet")
    names = target_weights(params, "transformer")
    s = LoraSet({n: params[n] for n in names}, 2, 1.0, device=host.device, seed=3)
    for a in s.adapters.values():
        with torch.no_grad():
            a.up.normal_(0, 0.5)
    x, sig = torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    cond = host.encode_text(["a dog"])
    with torch.no_grad(), host.parameter_patches(s.patches()):
        patched = host.denoise(x, sig, cond)
    merged = {n: lambda w, _d=s.adapters[n].delta().detach(): w + _d for n in names}
    with torch.no_grad(), host.parameter_patches(merged):
        ref = host.denoise(x, sig, cond)
    assert torch.allclose(patched, ref, atol=1e-6)
    assert not torch.allclose(patched, host.denoise(x, sig, cond), atol=1e-4)


REFERENCE_COUNTS = {  # algorithms.md §2.5 (counted on the real models)
    ("sd1", "attention"): 128, ("sd1", "transformer"): 192,
    ("sdxl", "attention"): 560, ("sdxl", "transformer"): 722,
}


def _real_params(family: str, naming: str) -> dict:
    a = architectures.arch(family)
    if naming == "diffusers":
        return {f"unet.{k}": torch.empty(s, device="meta") for k, s in a.unet_params.items()}
    m = comfy_lora.d2l(family)
    return {f"diffusion_model.{m[k]}": torch.empty(s, device="meta") for k, s in a.unet_params.items()}


@pytest.mark.parametrize("family,preset", sorted(REFERENCE_COUNTS))
@pytest.mark.parametrize("naming", ["diffusers", "comfyui"])
def test_targets_on_the_real_models_load_in_comfyui_and_a1111(family, preset, naming):
    """The presets pick the reference number of layers on the real SD1.5 / SDXL UNets, in both
    hosts' naming, and the file they give loads with zero missing or unused keys through the
    re-implemented ComfyUI and A1111 key maps (tests/oracles)."""
    params = _real_params(family, naming)
    names = target_weights(params, preset)
    assert len(names) == REFERENCE_COUNTS[(family, preset)]
    layers = {}
    for n in names:
        w = params[n]
        r = 1
        down = torch.full((r, *w.shape[1:]), 0.01)
        up = torch.full((w.shape[0], r, *((1, 1) if w.ndim == 4 else ())), 0.01)
        layers[n[: -len(".weight")]] = (down, up, 1.0)
    sd = kohya_lora.lora_state_dict(layers, family=family,
                                    naming=comfy_lora.comfy_naming(family) if naming == "comfyui" else None)
    a = architectures.arch(family)
    patches, missing = comfy_lora.comfy_check(a, sd)
    assert missing == [] and len(patches) == len(names)
    modules, failed, applied, _ = a1111_lora.a1111_check(a, sd)
    assert failed == {} and len(applied) == len(names)


def test_text_encoder_targets(tiny_sdxl_host):
    host = tiny_sdxl_host
    for key in ("clip_l", "clip_g"):
        params = host.tunable_parameters(key)
        attn = target_weights(params, "attention", text_encoder=True)
        full = target_weights(params, "transformer", text_encoder=True)
        assert attn and all(".self_attn." in n for n in attn)
        assert len(full) == len(attn) * 6 // 4  # + fc1, fc2 per layer


def test_extract_lora_reconstructs_a_low_rank_delta():
    g = torch.Generator().manual_seed(0)
    d_lin = torch.randn(12, 3, generator=g) @ torch.randn(3, 10, generator=g)
    d_conv = (torch.randn(8, 2, generator=g) @ torch.randn(2, 4 * 9, generator=g)).reshape(8, 4, 3, 3)
    out = extract_lora({"unet.a.weight": d_lin, "unet.b.weight": d_conv, "unet.a.bias": torch.ones(12)}, rank=3)
    assert set(out) == {"unet.a", "unet.b"}
    for name, d in (("unet.a", d_lin), ("unet.b", d_conv)):
        down, up, alpha = out[name]
        assert torch.allclose(kohya_lora.weight_delta(down, up, alpha), d, atol=1e-4)


def test_min_snr_weights_match_the_paper_forms():
    sigma = torch.tensor([0.03, 0.3, 1.0, 3.0, 14.6])
    snr = 1 / sigma.double() ** 2
    eps = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    v = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)
    assert torch.allclose(min_snr_weights(sigma, 5.0, "eps").double(), eps, rtol=1e-6)
    assert torch.allclose(min_snr_weights(sigma, 5.0, "v").double(), v, rtol=1e-6)
    assert float(min_snr_weights(torch.tensor([20.0]), 5.0, "eps")) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ training runs

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_run_writes_a_loadable_file_and_leaves_the_host_alone(request, tmp_path, family):
    host = request.getfixturevalue(f"tiny_{family}_host")
    before = snapshot(host)
    cfg = cfg_for(tmp_path, class_prompt="a photo of a dog", num_class_images=2, class_sample_steps=2,
                  batch_size=2, min_snr_gamma=5.0, noise_offset=0.05, train_text_encoder=True,
                  save_dtype="fp32", targets="transformer")
    res = train_dreambooth(host, images(), cfg)
    assert_unchanged(host, before)
    assert res.class_images == 2 and len(res.losses) == 3
    (path,) = res.files
    assert path == tmp_path / "loras" / "subject.safetensors"
    loaded, meta = kohya_lora.load_lora(path, family=family, layout=host.unet_layout())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_num_reg_images"] == "2"
    assert len(loaded) == len(res.lora_layers)
    te_keys = [n for n in res.lora_layers if n.startswith("text_encoder")]
    assert te_keys, "text-encoder layers were trained and must be in the file"
    for name, (down, up, alpha) in res.lora_layers.items():
        d2, u2, a2 = loaded[layer_names.normalize_layer_name(name, family, host.unet_layout())]
        assert torch.equal(d2, down) and torch.equal(u2, up) and a2 == alpha


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_full_finetune_checkpoint_reloads_to_the_trained_weights(request, tmp_path, family):
    host = request.getfixturevalue(f"tiny_{family}_host")
    before = snapshot(host)
    cfg = cfg_for(tmp_path, mode="full", output_dir=tmp_path / "ckpt", learning_rate=1e-3, optimizer="adafactor",
                  gradient_checkpointing=True, train_text_encoder=True, text_encoder_lr=1e-3, extract_rank=2)
    res = train_dreambooth(host, images(), cfg)
    assert_unchanged(host, before)
    ckpt = tmp_path / "ckpt" / "subject.safetensors"
    assert ckpt in res.files and (tmp_path / "ckpt" / "subject_lora.safetensors") in res.files
    moved = {k: d for k, d in res.deltas.items() if d.abs().max() > 0}
    assert any(k.startswith("unet.") for k in moved) and any(k.startswith("text_encoder") for k in moved)
    config = tiny_models.save_diffusers_folder(tiny_models.host_parts(host), tmp_path / "config")
    reloaded = DiffusersHost.load(ckpt, device="cpu", dtype=torch.float32, family=family, config_dir=config)
    got = {f"unet.{k}": v for k, v in reloaded.unet.state_dict().items()}
    for i, te in enumerate(reloaded.text_encoder_modules):
        got.update({f"{'text_encoder' if i == 0 else 'text_encoder_2'}.{k}": v for k, v in te.state_dict().items()})
    base = host.frozen_parameters()
    for k, d in res.deltas.items():
        assert torch.equal(got[k], base[k] + d), k


def test_pivotal_trains_vectors_then_only_the_lora(tmp_path, tiny_sd1_host):
    host = tiny_sd1_host
    before = snapshot(host)
    cfg = cfg_for(tmp_path, mode="pivotal", token="sks_lk", class_prompt="a photo of a dog", prior_weight=0.0,
                  embedding_dir=tmp_path / "emb", steps=4, ti_fraction=0.5, bundle_embedding=True,
                  ti_learning_rate=0.05)
    res = train_dreambooth(host, images(), cfg)
    assert_unchanged(host, before)
    names = sorted(p.name for p in res.files)
    assert names == ["sks_lk.pt", "sks_lk.safetensors", "subject.safetensors"]
    init = host.token_embeddings("dog")["clip_l"][0]
    assert not torch.allclose(res.vectors["clip_l"][0], init)  # the vectors were trained
    emb = safetensors.torch.load_file(tmp_path / "emb" / "sks_lk.safetensors")  # tiny width: read raw
    assert torch.equal(emb["emb_params"], res.vectors["clip_l"])
    bundled = safetensors.torch.load_file(tmp_path / "loras" / "subject.safetensors")
    assert torch.allclose(bundled["bundle_emb.sks_lk.string_to_param.*"].float(), res.vectors["clip_l"], atol=1e-3)


def test_a_group_stops_learning_after_its_step():
    """The pivot: vectors learn for the first ``until`` steps only."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    seen = {}

    class M:
        def param_groups(self):
            return [{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.1, "until": 2}]

        def parameters(self):
            return [a, b]

        def loss(self, step):
            seen[step] = b.detach().clone()
            return (a ** 2).sum() + (b ** 2).sum()

    loop.run(M(), loop.LoopConfig(steps=5, learning_rate=0.1), device=torch.device("cpu"),
             compute_dtype=torch.float32, save=lambda s: None)
    assert not torch.equal(seen[1], seen[3])  # moved during steps 1-2
    assert torch.equal(seen[3], seen[5]) and torch.equal(seen[5], b.detach())
    assert float(a.detach()[0]) < float(seen[5][0])


def test_adafactor_minimises_with_factored_state():
    w = torch.nn.Parameter(torch.zeros(16, 8))
    target = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    opt = loop.Adafactor([w], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
    assert float((w.detach() - target).abs().max()) < 0.1
    st = opt.state[w]
    assert st["row"].shape == (16,) and st["col"].shape == (8,) and "v" not in st


def test_cancel_saves_the_last_good_lora(tmp_path, tiny_sd1_host):
    def progress(step, total, loss, preview):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dreambooth(tiny_sd1_host, images(), cfg_for(tmp_path, steps=5), progress=progress)
    _, meta = kohya_lora.load_lora(tmp_path / "loras" / "subject.safetensors", family="sd1",
                           layout=tiny_sd1_host.unet_layout())
    assert meta["ss_steps"] == "2"


def test_captions_are_used_when_every_image_has_one(tmp_path, tiny_sd1_host):
    imgs = images()
    imgs.captions[:] = [f"a photo of sks_lk dog, view {i}" for i in range(3)]
    seen = []
    real = tiny_sd1_host.encode_text

    def spy(prompts, *a, **k):
        seen.extend(prompts)
        return real(prompts, *a, **k)

    tiny_sd1_host.encode_text = spy
    try:
        train_dreambooth(tiny_sd1_host, imgs, cfg_for(tmp_path, steps=4))
    finally:
        del tiny_sd1_host.encode_text
    assert seen and all(p.startswith("a photo of sks_lk dog, view") for p in seen)


# ------------------------------------------------------------------------------------- bad input

class _NotTunable:
    """A host that can run Textual Inversion but exposes no weights to patch."""

    def __init__(self, host):
        self._h = host

    def __getattr__(self, name):
        if name in ("tunable_parameters", "parameter_patches", "unet_layout", "gradient_checkpointing"):
            raise AttributeError(name)
        return getattr(self._h, name)


@pytest.mark.parametrize("case,match", [
    ("no_images", "no instance images"),
    ("rank", "rank must be at least 1"),
    ("host", "cannot be fine-tuned"),
    ("class_without_prompt", "no class prompt"),
    ("pivotal_prompt", "must contain the new word"),
    ("existing_word", "already"),
    ("bad_name", "name"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, tiny_sd1_host, case, match):
    host, imgs, cls, kw = tiny_sd1_host, images(), None, {}
    if case == "no_images":
        imgs = D.TrainingImages([], [], [])
    elif case == "rank":
        kw = dict(rank=0)
    elif case == "host":
        host = _NotTunable(host)
    elif case == "class_without_prompt":
        cls = images(2)
    elif case == "pivotal_prompt":
        kw = dict(mode="pivotal", token="sks_lk", instance_prompt="a photo of a dog")
    elif case == "existing_word":
        kw = dict(mode="pivotal", token="dog", instance_prompt="a photo of dog")
    elif case == "bad_name":
        kw = dict(name="../escape")
    before = snapshot(tiny_sd1_host)
    with pytest.raises(ValueError, match=match):
        train_dreambooth(host, imgs, cfg_for(tmp_path, **kw), class_images=cls)
    assert not (tmp_path / "loras").exists() or not any((tmp_path / "loras").iterdir())
    assert_unchanged(tiny_sd1_host, before)


def test_class_images_follow_the_training_size(tmp_path, tiny_sd1_host):
    """Class images drawn at another size than the training images (the user changed the training
    resolution only) are resized to the training size instead of refused."""
    cfg = cfg_for(tmp_path, class_prompt="a photo of a dog")
    for size in (96, 48):
        plan = prepare(tiny_sd1_host, images(), cfg, class_images=images(2, size=size))
        assert [tuple(im.shape) for im in plan.class_images] == [(64, 64, 3)] * 2
    wide = D.images_from_batch(torch.rand(1, 40, 100, 3))
    assert tuple(prepare(tiny_sd1_host, images(), cfg, class_images=wide).class_images[0].shape) == (64, 64, 3)


def test_no_silent_overwrite(tmp_path, tiny_sd1_host):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "subject.safetensors").write_bytes(b"user's file")
    with pytest.raises(FileExistsError):
        train_dreambooth(tiny_sd1_host, images(), cfg_for(tmp_path))
    assert (tmp_path / "loras" / "subject.safetensors").read_bytes() == b"user's file"


def test_patches_are_removed_even_when_training_fails(tiny_sd1_host):
    host = tiny_sd1_host
    params = host.tunable_parameters("unet")
    name = target_weights(params, "attention")[0]
    with contextlib.suppress(RuntimeError), host.parameter_patches({name: lambda w: w * 0}):
        raise RuntimeError("boom")
    x, sig, cond = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), host.encode_text(["a"])
    with torch.no_grad():
        out = host.denoise(x, sig, cond)
        with host.parameter_patches({name: lambda w: w}):
            assert torch.equal(out, host.denoise(x, sig, cond))
    module = host.unet.get_submodule(name[len("unet."): -len(".weight")])
    assert not torch.nn.utils.parametrize.is_parametrized(module)
