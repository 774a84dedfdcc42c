"""The diffusers host (hosts/diffusers/) honours the seam (trainers/seam.py) on tiny SD1 / SD2 (v) / SDXL
models."""
import hashlib
import json
import socket

import pytest
import torch
from safetensors.torch import save_file

import tiny_models as tm
from likeness.hosts import diffusers as hd
from likeness.hosts.diffusers import DiffusersCond, DiffusersHost, detect_family
from likeness.hosts.diffusers.host import _sigma_to_t
from likeness.hosts.diffusers.text import tokenize
from likeness.trainers.seam import Host, ImageMeta

HOSTS = ["tiny_sd1_host", "tiny_sd2_host", "tiny_sdxl_host"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # tiny tensors: threads only add spin-waiting, which on a shared machine costs minutes
    with tm.one_thread():
        yield
FAMILY = {"tiny_sd1_host": "sd1", "tiny_sd2_host": "sd2", "tiny_sdxl_host": "sdxl"}
KEYS = {"sd1": {"clip_l": 32}, "sd2": {"clip_h": 48}, "sdxl": {"clip_l": 32, "clip_g": 64}}


def _noisy(host, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 8, 8, generator=g)
    sigma = host.training_sigmas()[torch.tensor([10, 500, 999, 250][:b])]
    return x0, sigma, x0 + sigma.view(-1, 1, 1, 1) * torch.randn(b, 4, 8, 8, generator=g)


def _ph_vectors(host, word="cat", noise=0.0, grad=False):
    vec = host.token_embeddings(word)
    vec = {k: (v + noise * torch.randn_like(v)) for k, v in vec.items()}
    return {k: v.requires_grad_(grad) for k, v in vec.items()}


# ---- shapes and protocol -----------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTS)
def test_shapes_and_protocol(name, request):
    host = request.getfixturevalue(name)
    fam = FAMILY[name]
    assert isinstance(host, Host)
    assert host.info.family == fam and host.info.prediction == ("v" if fam == "sd2" else "eps")
    assert {e.key: e.width for e in host.text_encoders()} == KEYS[fam]
    assert (host.latent_channels, host.latent_scale, host.compute_dtype) == (4, 8, torch.float32)
    images = torch.rand(2, 64, 48, 3)
    z = host.encode_images(images)
    assert z.shape == (2, 4, 8, 6) and z.dtype == torch.float32 and not z.requires_grad
    px = host.decode_latents(z)
    assert px.shape == (2, 64, 48, 3) and px.device.type == "cpu" and 0 <= px.min() and px.max() <= 1
    cond = host.encode_text(["a photo of a cat", ""])
    assert isinstance(cond, DiffusersCond) and len(cond) == 2
    assert cond.context.shape == (2, 77, sum(KEYS[fam].values()) if fam != "sdxl" else 96)
    x0, sigma, x = _noisy(host)
    out = host.denoise(x, sigma, cond)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", HOSTS)
def test_sigmas_are_the_schedule(name, request):
    host = request.getfixturevalue(name)
    sig = host.training_sigmas()
    ac = tm.tiny_scheduler().alphas_cumprod.double()
    assert sig.shape == (1000,) and sig.dtype == torch.float32 and bool((sig[1:] > sig[:-1]).all())
    torch.testing.assert_close(sig.double(), ((1 - ac) / ac).sqrt(), rtol=1e-6, atol=0)


def test_sigma_to_t_is_exact_on_the_grid_and_interpolates_between(tiny_sd1_host):
    log_sigmas = tiny_sd1_host._log_sigmas
    sig = log_sigmas.exp()
    t = _sigma_to_t(sig[[0, 1, 500, 998, 999]], log_sigmas)
    assert t.tolist() == [0.0, 1.0, 500.0, 998.0, 999.0]
    mid = (log_sigmas[[10, 700]] + log_sigmas[[11, 701]]) / 2
    torch.testing.assert_close(_sigma_to_t(mid.exp(), log_sigmas), torch.tensor([10.5, 700.5]).double())


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_native_loss_is_the_diffusers_training_loss_in_float64(family):
    """((x0_hat - x0) / output_scale)^2 == diffusers' eps-MSE (SD1, SDXL) / v-MSE (SD2) terms."""
    parts = tm.build_tiny(family, seed=3)
    sched = parts["scheduler"]
    host = DiffusersHost.from_components(**parts, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 500, 999])
    ac = sched.alphas_cumprod.double()[t]
    sigma = ((1 - ac) / ac).sqrt()
    cond = host.encode_text(["a photo of a cat", "a dog", ""])
    x0_hat = host.denoise(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, cond)
    ours = ((x0_hat - x0) / host.output_scale(sigma).view(-1, 1, 1, 1)) ** 2
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": cond.pooled,
                                      "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 3).double()}
    pred = host.unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond.context, **extra).sample
    target = sched.get_velocity(x0, noise, t) if family == "sd2" else noise
    assert x0_hat.dtype == torch.float64
    torch.testing.assert_close(ours, (pred - target) ** 2, rtol=1e-9, atol=1e-12)


# ---- gradients and frozen weights -------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTS)
def test_frozen_parameters_cover_every_module(name, request):
    host = request.getfixturevalue(name)
    params = host.frozen_parameters()
    prefixes = {k.split(".")[0] for k in params}
    expected = {"unet", "vae", "text_encoder"} | ({"text_encoder_2"} if FAMILY[name] == "sdxl" else set())
    assert prefixes == expected
    n = sum(p.numel() for m in [host.unet, host.vae, *host.text_encoder_modules] for p in m.parameters())
    assert sum(p.numel() for p in params.values()) == n


# ---- placeholder splicing ----------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTS)
def test_placeholder_vectors_change_the_cond(name, request):
    host = request.getfixturevalue(name)
    torch.manual_seed(0)
    a = host.encode_text(["a photo of xyzw"], "xyzw", _ph_vectors(host, "cat"))
    b = host.encode_text(["a photo of xyzw"], "xyzw", _ph_vectors(host, "cat", noise=0.05))
    assert not torch.allclose(a.context, b.context)
    # CLIP's attention is causal: BOS "a photo of" (positions 0-3) cannot see the placeholder
    torch.testing.assert_close(a.context[:, :4], b.context[:, :4])
    assert not torch.allclose(a.context[:, 4:], b.context[:, 4:])


@pytest.mark.parametrize("name", HOSTS)
def test_tokens_padding_and_truncation(name, request):
    host = request.getfixturevalue(name)
    pads = {"sd1": [49407], "sd2": [0], "sdxl": [49407, 0]}[FAMILY[name]]
    for tok, pad in zip(host.tokenizers, pads):
        t = tokenize(tok, ["a photo of a cat", "word " * 100, "xyzw xyzw"], "xyzw", 3, host.device)
        assert t.ids.shape == (3, 77)
        assert t.ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert (t.ids[0, 7:] == pad).all() and (t.slot[0] == -1).all()
        assert t.ids[1, 0] == 49406 and t.ids[1, 76] == 49407 and (t.ids[1, 1:76] == 2653).all()  # "word"
        assert t.slot[2, 1:7].tolist() == [0, 1, 2, 0, 1, 2] and t.ids[2, 7] == 49407


def test_encode_text_rejects_bad_input(tiny_sd1_host, tiny_sdxl_host):
    host = tiny_sd1_host
    with pytest.raises(TypeError, match="list of prompts"):
        host.encode_text("a photo of a cat")
    with pytest.raises(ValueError, match=r"vectors\['clip_l'\] must be \[n, 32\]"):
        host.encode_text(["xyzw"], "xyzw", {"clip_l": torch.zeros(2, 31)})
    with pytest.raises(ValueError, match="no vectors"):
        host.encode_text(["a photo of xyzw"], "xyzw", None)
    with pytest.raises(ValueError, match="ImageMeta"):
        host.encode_text(["a", "b"], meta=[ImageMeta((64, 64))])
    with pytest.raises(ValueError, match="same number of vectors"):
        tiny_sdxl_host.encode_text(["xyzw"], "xyzw", {"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(1, 64)})
    cond = host.encode_text(["a", "b"])
    x0, sigma, x = _noisy(host, b=3)
    with pytest.raises(ValueError, match="batch mismatch"):
        host.denoise(x, sigma, cond)


# ---- SDXL conditioning -------------------------------------------------------------------------


def test_sdxl_cond_has_pooled_and_size_conditioning(tiny_sdxl_host):
    host = tiny_sdxl_host
    meta = [ImageMeta((128, 96), (4, 8)), ImageMeta((64, 64))]
    cond = host.encode_text(["a photo of a cat", "a dog"], meta=meta)
    assert cond.context.shape == (2, 77, 32 + 64) and cond.pooled.shape == (2, 64)
    assert cond.time_ids((64, 64)).tolist() == [[128, 96, 4, 8, 64, 64], [64, 64, 0, 0, 64, 64]]
    plain = host.encode_text(["a photo of a cat", "a dog"])
    assert plain.time_ids((64, 48)).tolist() == [[64, 48, 0, 0, 64, 48]] * 2
    torch.testing.assert_close(plain.context, cond.context)
    # the context is the penultimate layer of each encoder, side by side; pooled is clip_g's projection
    ids = [torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [p] * 70]) for p in (49407, 0)]
    te1, te2 = host.text_encoder_modules
    h1 = te1(input_ids=ids[0], output_hidden_states=True).hidden_states[-2]
    o2 = te2(input_ids=ids[1], output_hidden_states=True)
    torch.testing.assert_close(cond.context[:1], torch.cat([h1, o2.hidden_states[-2]], -1))
    torch.testing.assert_close(cond.pooled[:1], o2.text_embeds)
    # size conditioning reaches the denoiser
    x0, sigma, x = _noisy(host)
    assert not torch.allclose(host.denoise(x, sigma, cond), host.denoise(x, sigma, plain))


# ---- words, embeddings, images ------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTS)
def test_check_placeholder(name, request):
    host = request.getfixturevalue(name)
    for bad in ("cat", "Cat", " dog ", "<|endoftext|>", "!"):
        with pytest.raises(ValueError, match="sks-cat"):
            host.check_placeholder(bad)
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            host.check_placeholder(bad)
    for good in ("sks-cat", "xyzw", "<my-thing>"):
        host.check_placeholder(good)


@pytest.mark.parametrize("name", HOSTS)
def test_token_embeddings(name, request):
    host = request.getfixturevalue(name)
    emb = host.token_embeddings("a red apple")
    assert set(emb) == set(KEYS[FAMILY[name]])
    for key, te in zip(emb, host.text_encoder_modules):
        assert emb[key].shape == (3, KEYS[FAMILY[name]][key]) and emb[key].dtype == torch.float32
        torch.testing.assert_close(emb[key][2], te.get_input_embeddings().weight[3055])  # "apple</w>"
        assert not emb[key].requires_grad


def test_shipped_clip_tokenizer_ids():
    tok = hd.clip_tokenizer()
    assert len(tok) == 49408 and tok.pad_token_id == 49407 and hd.clip_tokenizer("!").pad_token_id == 0
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("dog apple, zebra!", add_special_tokens=False).input_ids == [1929, 3055, 267, 22548, 256]


def test_encode_images_is_deterministic_and_checks_size(tiny_sd1_host):
    host = tiny_sd1_host
    img = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(host.encode_images(img), host.encode_images(img))  # posterior mean, not a sample
    with pytest.raises(ValueError, match="multiple of 8.*56x64"):
        host.encode_images(torch.rand(1, 60, 64, 3))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        host.encode_images(torch.rand(1, 3, 64, 64))


def test_compute_dtype_policy():
    assert hd.pick_compute_dtype(torch.device("cpu")) == torch.float32
    if torch.cuda.is_available():
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert hd.pick_compute_dtype(torch.device("cuda")) == want


# ---- the rest of the seam: protocols, training context, latent grid, differentiable decode ----------


@pytest.mark.parametrize("name", HOSTS)
def test_latent_multiple_is_two_to_the_unet_downsamplings(name, request):
    host = request.getfixturevalue(name)
    assert host.latent_multiple == 2 ** (len(host.unet.config.block_out_channels) - 1) == 2  # tiny: 2 levels


# ---- results: a new host with a LoRA or deltas merged (seam.Exportable) ---------------------------


def _snapshot(host):
    return {k: v.detach().clone() for k, v in host.frozen_parameters().items()}


def _unchanged(host, before):
    after = host.frozen_parameters()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def _denoised(host, seed=0):
    x0, sigma, x = _noisy(host, seed=seed)
    with torch.no_grad():
        return host.denoise(x, sigma, host.encode_text(["a photo of a cat", "dog"]))


def _param_name(host, part, suffix):
    (name,) = [n for n in host.tunable_parameters(part) if n.endswith(suffix)]
    return name


def _kohya_layer(key, weight, rank, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    down, up = torch.randn(rank, weight.shape[1], generator=g), torch.randn(weight.shape[0], rank, generator=g)
    tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    return tensors, up @ down * (alpha / rank)


# kohya keys written by hand: SD1 names UNet modules by their diffusers path, SDXL by the LDM one
# (tiny SDXL: one res block per level, so down_blocks.1.attentions.0 is input_blocks.3.1)
LORA_CASES = {
    "tiny_sd1_host": [("unet", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                       "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
                      ("clip_l", "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                       "layers.0.self_attn.q_proj.weight")],
    "tiny_sdxl_host": [("unet", "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k",
                        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
                       ("clip_g", "lora_te2_text_model_encoder_layers_1_mlp_fc1", "layers.1.mlp.fc1.weight")],
}


@pytest.mark.parametrize("name", list(LORA_CASES))
def test_with_lora_denoises_as_adding_its_delta_does(name, request):
    """up @ down * alpha / rank * strength (model strength for the UNet, clip for the encoders),
    compared with the same delta added on the fly by the host's own parameter patches."""
    host = request.getfixturevalue(name)
    before = _snapshot(host)
    lora, expected = {}, {}
    for i, (part, key, suffix) in enumerate(LORA_CASES[name]):
        param = _param_name(host, part, suffix)
        tensors, delta = _kohya_layer(key, host.tunable_parameters(part)[param], rank=2, alpha=1.5, seed=i)
        lora.update(tensors)
        expected[param] = delta * (0.5 if part == "unet" else 2.0)
    merged = host.with_lora(lora, strength_model=0.5, strength_clip=2.0)
    _unchanged(host, before)
    with host.parameter_patches({n: (lambda p, d=d: p + d) for n, d in expected.items()}):
        want = _denoised(host)
    torch.testing.assert_close(_denoised(merged), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_denoised(host), want)
    _unchanged(host, before)


def test_with_lora_refuses_layers_the_model_lacks(tiny_sd1_host):
    tensors, _ = _kohya_layer("lora_unet_down_blocks_3_attentions_0_proj_in", torch.zeros(32, 32), 2, 1.0, 0)
    with pytest.raises(ValueError, match="down_blocks_3|down_blocks.3"):
        tiny_sd1_host.with_lora(tensors)


def test_with_deltas_is_a_new_host_over_copies_of_the_changed_modules(tiny_sd1_host):
    host = tiny_sd1_host
    before = _snapshot(host)
    name = _param_name(host, "unet", "conv_in.weight")
    delta = torch.randn(before[name].shape, generator=torch.Generator().manual_seed(3)) * 0.1
    new = host.with_deltas({name: delta})
    _unchanged(host, before)
    assert new is not host and new.unet is not host.unet
    assert new.vae is host.vae and new.text_encoder_modules[0] is host.text_encoder_modules[0]
    torch.testing.assert_close(new.frozen_parameters()[name], before[name] + delta, rtol=0, atol=0)
    assert sum(not torch.equal(p, before[k]) for k, p in new.frozen_parameters().items()) == 1
    assert new.info.family == "sd1" and new.info.hash is None
    assert not torch.allclose(_denoised(new), _denoised(host))
    with pytest.raises(ValueError, match="does not have"):
        host.with_deltas({"unet.no_such_layer.weight": delta})


# ---- loading ------------------------------------------------------------------------------------


def _same_model(a, b):
    pa, pb = a.frozen_parameters(), b.frozen_parameters()
    assert set(pa) == set(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)
    x0, sigma, x = _noisy(a)
    ca, cb = a.encode_text(["a photo of a cat", "dog"]), b.encode_text(["a photo of a cat", "dog"])
    torch.testing.assert_close(a.denoise(x, sigma, ca), b.denoise(x, sigma, cb), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_load_diffusers_folder_round_trip(family, tmp_path):
    parts = tm.build_tiny(family, seed=1)
    host = DiffusersHost.from_components(**parts)
    folder = tm.save_diffusers_folder(parts, tmp_path / f"tiny-{family}")
    loaded = DiffusersHost.load(folder, device="cpu")
    assert (loaded.info.family, loaded.info.prediction, loaded.info.name) == (
        family, host.info.prediction, f"tiny-{family}")
    assert loaded.info.hash is None and loaded.compute_dtype == torch.float32
    _same_model(host, loaded)
    assert DiffusersHost.load(folder, device="cpu", prediction="eps").info.prediction == "eps"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_load_single_file_round_trip(family, tmp_path):
    """A tiny model written in the original single-file layout loads back bit-identically through the
    same code real checkpoints take (only the config folder is the tiny one instead of the shipped)."""
    parts = tm.build_tiny(family, seed=2)
    host = DiffusersHost.from_components(**parts)
    config = tm.save_diffusers_folder(parts, tmp_path / "config")
    sd = tm.to_ldm_state_dict(parts)
    assert detect_family(sd) == family
    path = tmp_path / f"tiny-{family}.safetensors"
    save_file(sd, str(path))
    loaded = DiffusersHost.load(path, device="cpu", config_dir=config)
    assert (loaded.info.family, loaded.info.prediction) == (family, host.info.prediction)
    assert loaded.info.hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    _same_model(host, loaded)
    if family == "sd2":  # SD2 is v unless told otherwise
        assert DiffusersHost.load(path, device="cpu", config_dir=config, prediction="eps").info.prediction == "eps"


def test_load_ckpt_with_weights_only(tmp_path, tiny_sd2_host):
    parts = tm.host_parts(tiny_sd2_host)
    config = tm.save_diffusers_folder(parts, tmp_path / "config")
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": tm.to_ldm_state_dict(parts), "global_step": 7}, path)  # Lightning layout
    _same_model(tiny_sd2_host, DiffusersHost.load(path, "cpu", config_dir=config))


class _Gadget:  # an object a pickle would have to construct
    pass


def test_ckpt_needing_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Gadget()}, path)
    with pytest.raises(ValueError, match="arbitrary code"):
        DiffusersHost.load(path, device="cpu")


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        DiffusersHost.load(tmp_path / "missing.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        DiffusersHost.load(tmp_path / "notes.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        DiffusersHost.load(tmp_path / "broken.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        DiffusersHost.load(tmp_path / "folder")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="looks like a LoRA"):
        DiffusersHost.load(tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="prediction"):
        DiffusersHost.load(tmp_path / "lora.safetensors", prediction="x0")


def test_incomplete_checkpoint_is_an_error_not_random_weights(tmp_path):
    parts = tm.build_tiny("sd1", seed=2)
    config = tm.save_diffusers_folder(parts, tmp_path / "config")
    sd = tm.to_ldm_state_dict(parts)
    del sd["model.diffusion_model.out.2.weight"]
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match="1 unet weights are missing"):
        DiffusersHost.load(tmp_path / "cut.safetensors", config_dir=config)
    # and a file of one family does not fit another family's architecture
    save_file(tm.to_ldm_state_dict(parts), str(tmp_path / "sd1.safetensors"))
    with pytest.raises(ValueError, match="do not fit|missing"):
        DiffusersHost.load(tmp_path / "sd1.safetensors", config_dir=tm.save_diffusers_folder(
            tm.build_tiny("sd2"), tmp_path / "sd2config"))


def _keys(*names, conv_in=4):
    sd = {k: torch.zeros(1) for k in names}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, conv_in, 3, 3)
    return sd


def test_detect_family_from_keys():
    assert detect_family(_keys("cond_stage_model.transformer.text_model.x")) == "sd1"
    assert detect_family(_keys("cond_stage_model.model.token_embedding.weight")) == "sd2"
    sdxl = _keys("conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x")
    assert detect_family(sdxl) == "sdxl"
    for sd, match in [(_keys("conditioner.embedders.0.model.x"), "refiner"),
                      (_keys("cond_stage_model.transformer.x", conv_in=9), "9 input channels"),
                      (_keys("model.diffusion_model.joint_blocks.0.x"), "SD3"),
                      (_keys(), "no text encoder"),
                      ({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, "looks like a VAE"),
                      ({"emb_params": torch.zeros(1, 768)}, "embedding")]:
        with pytest.raises(ValueError, match=match):
            detect_family(sd)


def test_loading_never_touches_the_network(tmp_path, monkeypatch):
    parts = tm.build_tiny("sdxl", seed=4)
    folder = tm.save_diffusers_folder(parts, tmp_path / "model")
    save_file(tm.to_ldm_state_dict(parts), str(tmp_path / "model.safetensors"))

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    DiffusersHost.load(folder, device="cpu")
    DiffusersHost.load(tmp_path / "model.safetensors", device="cpu", config_dir=folder)
    assert "HF_HUB_OFFLINE" not in __import__("os").environ  # restored after loading


def test_shipped_config_folders():
    """The shipped configs describe the real models (parameter counts of the published weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    counts = {"sd15": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}
    for name, n in counts.items():
        folder = hd.ASSETS / name
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
        assert sum(p.numel() for p in unet.parameters()) == n, name
        sched = hd.folder_scheduler(folder / "scheduler")
        assert hd.prediction_from_scheduler(sched) == ("v" if name == "sd2" else "eps")
        assert json.loads((folder / "model_index.json").read_text())["_class_name"].startswith("StableDiffusion")
    widths = {("sd15", "text_encoder"): 768, ("sd2", "text_encoder"): 1024, ("sdxl", "text_encoder"): 768,
              ("sdxl", "text_encoder_2"): 1280}
    for (name, sub), width in widths.items():
        assert CLIPTextConfig.from_pretrained(str(hd.ASSETS / name / sub)).hidden_size == width
    pads = {("sd15", "tokenizer"): 49407, ("sd2", "tokenizer"): 0, ("sdxl", "tokenizer"): 49407,
            ("sdxl", "tokenizer_2"): 0}
    for (name, sub), pad in pads.items():
        assert hd.folder_tokenizer(hd.ASSETS / name / sub).pad_token_id == pad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cuda_half_precision_weights_fp32_vectors(family):
    host = DiffusersHost.from_components(**tm.build_tiny(family), device="cuda",
                                         dtype=hd.pick_compute_dtype(torch.device("cuda")))
    assert all(p.dtype == host.compute_dtype and p.is_cuda for k, p in host.frozen_parameters().items()
               if not k.startswith("vae."))
    vectors = {k: v.requires_grad_(True) for k, v in host.token_embeddings("cat").items()}
    assert all(v.dtype == torch.float32 and v.is_cuda for v in vectors.values())
    x0 = host.encode_images(torch.rand(2, 64, 64, 3))
    assert x0.dtype == torch.float32 and x0.is_cuda
    sigma = host.training_sigmas()[[100, 900]]
    cond = host.encode_text(["a photo of xyzw"] * 2, "xyzw", vectors)
    out = host.denoise(x0 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x0), sigma, cond)
    assert out.dtype == torch.float32
    out.square().mean().backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in vectors.values())
    assert host.decode_latents(x0).device.type == "cpu"


# ---- the briefly trained model (fixture for recovery tests elsewhere) ----------------------------


def _class_loss(host, data, vectors, seed=5, rounds=6):
    """Native denoising loss of ``data`` under "a photo of a <placeholder>" with ``vectors``."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        cond = host.encode_text(["a photo of a xyzw"] * len(data), "xyzw", vectors)
        for _ in range(rounds):
            t = torch.randint(0, 1000, (len(data),), generator=g)
            sigma = host.training_sigmas()[t]
            x = data + sigma.view(-1, 1, 1, 1) * torch.randn(data.shape, generator=g)
            err = (host.denoise(x, sigma, cond) - data) / host.output_scale(sigma).view(-1, 1, 1, 1)
            total += err.square().mean().item()
    return total / rounds


@pytest.mark.slow
def test_pretrained_tiny_sd1_depends_on_its_conditioning(pretrained_tiny_sd1):
    p = pretrained_tiny_sd1
    host = p.host
    assert host.info.family == "sd1" and host.info.prediction == "eps" and len(p.words) == 4
    imgs = p.images("zebra", 8, seed=3)
    assert imgs.shape == (8, 64, 64, 3) and 0 <= imgs.min() and imgs.max() <= 1
    data = p.latents("zebra", 8, seed=3)
    torch.testing.assert_close(data, host.encode_images(imgs))
    assert p.prompt("zebra") == "a photo of a zebra"
    losses = {w: _class_loss(host, data, host.token_embeddings(w)) for w in p.words}
    others = min(v for w, v in losses.items() if w != "zebra")
    assert losses["zebra"] < 0.85 * others, losses  # the right word explains the images clearly better
