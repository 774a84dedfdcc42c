"""The seam's contract (``trainers/seam.py``), checked once for every host.

Each promise a method relies on is one test, parametrised over every host Likeness has: the
diffusers host on tiny SD1 / SD2 (v-prediction) / SDXL models, and the ComfyUI host on tiny SD1 /
SDXL checkpoints loaded by ComfyUI's own loader (marker ``comfyui``; skipped without
``COMFYUI_PATH``).  A new host is done when it passes this file: add an ``Adapter`` for it (how
to build one, how to call its raw network, how to read back what it exports) and a ``Case`` per
model family.

    python -m pytest tests/host_contract.py                         # diffusers cases
    COMFYUI_PATH=... python -m pytest -m comfyui tests/host_contract.py
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from likeness.trainers import families, objective
from likeness.trainers.seam import DIFFUSERS_NAMING, Exportable, Host, ImageMeta, ParameterNaming, Tunable

PH = "lkxqz"  # a placeholder that is no single vocabulary token
PROMPTS = ["a photo", "a cat"]


# ---- adapters: what the contract needs to know about a host that the seam does not say ------------


class DiffusersAdapter:
    """The diffusers host (CLI, tests): built from tiny diffusers models."""

    node = staticmethod(contextlib.nullcontext)  # no host program around the calls
    decode_atol = 0.0  # the differentiable decode is the preview decode, to the bit

    @staticmethod
    def naming(family: str) -> ParameterNaming:
        return DIFFUSERS_NAMING[family]

    @staticmethod
    def raw(host, x_in: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The UNet's own output (eps or v) for a scaled input ``x_in`` at timesteps ``t``."""
        extra = {}
        if cond.pooled is not None:
            hw = (x_in.shape[-2] * host.latent_scale, x_in.shape[-1] * host.latent_scale)
            extra["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids(hw)}
        return host.unet(x_in, t, encoder_hidden_states=cond.context, **extra).sample.float()

    @staticmethod
    def as_host(result, like) -> Host:
        return result  # with_lora / with_deltas return a new DiffusersHost

    @staticmethod
    def in_dtype(c: "Case", host, dtype: torch.dtype) -> Host:
        """The same tiny model computing in ``dtype`` on the CPU (its own modules, cast)."""
        import tiny_models

        return tiny_models.tiny_host(c.family, seed=0, dtype=dtype)

    @staticmethod
    def reload(path, like, workdir) -> Host:
        """Through the single-file loader real checkpoints take, with the tiny model's own configs
        in place of the shipped full-size ones."""
        import tiny_models
        from likeness.hosts.diffusers import DiffusersHost

        config = tiny_models.save_diffusers_folder(tiny_models.host_parts(like), workdir / "config")
        return DiffusersHost.load(path, device="cpu", config_dir=config, prediction=like.info.prediction)


class ComfyAdapter:
    """The ComfyUI host: MODEL / CLIP / VAE from ComfyUI's own checkpoint loader, called the way a
    node calls it (under ``torch.inference_mode()``)."""

    node = staticmethod(torch.inference_mode)
    decode_atol = 1e-4  # ComfyUI's own VAE.decode (previews) runs its own path

    @staticmethod
    def naming(family: str) -> ParameterNaming:
        keys = families.family(family).encoder_keys
        return ParameterNaming("diffusion_model.", "ldm", {k: f"{k}.transformer." for k in keys})

    @staticmethod
    def raw(host, x_in: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        kw = host.model_kwargs(cond, x_in)
        unet = host._input_model.model.diffusion_model  # the BaseModel the MODEL wraps
        return unet(x_in, t.float(), context=kw["c_crossattn"], y=kw.get("y")).float()

    @staticmethod
    def as_host(result, like) -> Host:
        from likeness.hosts.comfy import ComfyHost

        model, clip = result
        with torch.inference_mode():
            return ComfyHost(model, clip, like._vae)

    @staticmethod
    def in_dtype(c: "Case", host, dtype: torch.dtype) -> Host:
        """The tiny checkpoint loaded by ComfyUI with its UNet and text encoders stored in ``dtype``."""
        import comfy.sd
        from support import tiny_checkpoints

        from likeness.hosts.comfy import ComfyHost

        path = tiny_checkpoints.ensure_tiny_checkpoint(c.fixture.partition(":")[2])
        opts = {"dtype": dtype}
        with torch.inference_mode():
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), model_options=opts,
                                                                     te_model_options=opts)[:3]
            return ComfyHost(model, clip, vae)

    @staticmethod
    def reload(path, like, workdir) -> Host:
        import comfy.sd

        from likeness.hosts.comfy import ComfyHost

        with torch.inference_mode():
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path))[:3]
            return ComfyHost(model, clip, vae)


class ForgeAdapter(ComfyAdapter):
    """The Forge host on engines Forge's own loader built from the tiny checkpoints (marker
    ``webui``; skipped without ``FORGE_PATH``).  Forge names parameters as ComfyUI does."""

    node = staticmethod(torch.inference_mode)  # the WebUI generates under inference mode
    decode_atol = 0.0

    @staticmethod
    def raw(host, x_in: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        from likeness.hosts.webui import common

        kwargs = {"y": host._size_vector(cond, x_in)} if host.info.family == "sdxl" else {}
        with common.substituted_weights(host._unet.model):
            return host._unet.model.diffusion_model(x_in, t.float(), context=cond["crossattn"], **kwargs).float()

    @staticmethod
    def as_host(result, like) -> Host:
        from likeness.hosts.webui.forge import ForgeHost

        return ForgeHost(like._engine, result)

    @staticmethod
    def reload(path, like, workdir) -> Host:
        from support import forge_runtime

        from likeness.hosts.webui.forge import ForgeHost

        return ForgeHost(forge_runtime.load_engine(path))

    @staticmethod
    def in_dtype(c: "Case", host, dtype: torch.dtype) -> Host:
        """The tiny checkpoint loaded by Forge's loader with its UNet stored in ``dtype`` (what
        ``--unet-in-bf16`` / ``--unet-in-fp16`` make it do)."""
        from backend.args import args
        from support import forge_runtime

        from likeness.hosts.webui.forge import ForgeHost

        flag = {torch.bfloat16: "unet_in_bf16", torch.float16: "unet_in_fp16"}[dtype]
        setattr(args, flag, True)
        try:
            return ForgeHost(forge_runtime.load_engine(forge_runtime.forge_checkpoint(c.fixture.partition(":")[2])))
        finally:
            setattr(args, flag, False)


class A1111Adapter(ComfyAdapter):
    """The AUTOMATIC1111 host on models A1111's own loader built from the tiny checkpoints (marker
    ``webui``; skipped without ``WEBUI_PATH``).  A1111 names parameters as ComfyUI does; it runs in
    fp32 on the CPU (``--no-half``), so the low-precision cases skip."""

    node = staticmethod(torch.no_grad)  # A1111 generates under no_grad (processing.process_images)
    decode_atol = 0.0

    @staticmethod
    def raw(host, x_in: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        with host._weights("unet"):
            return host._model.model.diffusion_model(x_in, t.float(), context=cond["crossattn"]).float()

    @staticmethod
    def as_host(result, like) -> Host:
        return result  # with_lora / with_deltas return a new A1111Host

    @staticmethod
    def in_dtype(c: "Case", host, dtype: torch.dtype) -> Host:
        return host  # the process's A1111 computes in fp32: the test skips

    @staticmethod
    def reload(path, like, workdir) -> Host:
        from support import a1111_runtime

        from likeness.hosts.webui.a1111 import A1111Host

        root = a1111_runtime.webui_path()
        return A1111Host(a1111_runtime.load_model(a1111_runtime.with_config(path, root, "sd15")))


@dataclass(frozen=True)
class Case:
    id: str
    fixture: str  # the pytest fixture that builds the host ("name", or "name:arch" for a loader)
    family: str
    prediction: str
    adapter: Any
    comfy: bool = False
    webui: bool = False

    def param(self):
        marks = [pytest.mark.comfyui] if self.comfy else []
        marks += [pytest.mark.webui] if self.webui else []
        return pytest.param(self, id=self.id, marks=marks)


CASES = [
    Case("diffusers-sd1", "tiny_sd1_host", "sd1", "eps", DiffusersAdapter),
    Case("diffusers-sd2", "tiny_sd2_host", "sd2", "v", DiffusersAdapter),
    Case("diffusers-sdxl", "tiny_sdxl_host", "sdxl", "eps", DiffusersAdapter),
    Case("comfy-sd1", "comfy_hosts:sd15", "sd1", "eps", ComfyAdapter, comfy=True),
    # ComfyUI's and Forge's own detection read the tiny SD2 checkpoint's flat norm biases as an eps
    # model (SD2 512-base); v-prediction is the diffusers-sd2 case's
    Case("comfy-sd2", "comfy_hosts:sd2", "sd2", "eps", ComfyAdapter, comfy=True),
    Case("comfy-sdxl", "comfy_hosts:sdxl", "sdxl", "eps", ComfyAdapter, comfy=True),
    Case("forge-sd1", "forge_hosts:sd15", "sd1", "eps", ForgeAdapter, webui=True),
    Case("forge-sd2", "forge_hosts:sd2", "sd2", "eps", ForgeAdapter, webui=True),
    Case("forge-sdxl", "forge_hosts:sdxl", "sdxl", "eps", ForgeAdapter, webui=True),
    Case("a1111-sd1", "a1111_hosts:sd15", "sd1", "eps", A1111Adapter, webui=True),
]


@pytest.fixture(scope="module")
def comfy_hosts(comfy_root):
    """ComfyHosts over the tiny checkpoints, by arch, each built on first use (inside a node's
    inference mode, as a node builds one) and kept for the module."""
    from support import comfy_runtime

    from likeness.hosts.comfy import ComfyHost

    built = {}

    def get(arch: str):
        if arch not in built:
            model, clip, vae = comfy_runtime.load_tiny(arch)
            with torch.inference_mode():
                built[arch] = ComfyHost(model, clip, vae)
        return built[arch]

    return get


def _built(make: Callable[[str], Any]) -> Callable[[str], Any]:
    """``make(arch)`` once per arch, kept."""
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = make(arch)
        return built[arch]

    return get


@pytest.fixture(scope="module")
def forge_hosts():
    """ForgeHosts over engines Forge's loader built from the tiny checkpoints, by arch, each built
    on first use and kept for the module."""
    from support import forge_runtime

    root = forge_runtime.forge_path()
    if root is None:
        pytest.skip("FORGE_PATH is not set to a Stable Diffusion WebUI Forge checkout (tests/support/get_webui.sh)")
    if "modules.sd_hijack" in sys.modules:
        pytest.skip("AUTOMATIC1111 is loaded in this process; run the Forge cases on their own (-k forge)")
    forge_runtime.import_forge(root)
    from likeness.hosts.webui.forge import ForgeHost

    return _built(lambda arch: ForgeHost(forge_runtime.load_tiny(arch)))


@pytest.fixture(scope="module")
def a1111_hosts():
    """A1111Hosts over models AUTOMATIC1111's loader built from the tiny checkpoints, by arch, each
    built on first use and kept for the module.  A1111 and Forge both name their package
    ``modules``: one WebUI per process."""
    from support import a1111_runtime

    root = a1111_runtime.in_this_process()
    from likeness.hosts.webui.a1111 import A1111Host

    return _built(lambda arch: A1111Host(a1111_runtime.load_tiny(root, arch)))


@pytest.fixture(params=[c.param() for c in CASES])
def case(request):
    c: Case = request.param
    name, _, arch = c.fixture.partition(":")  # "fixture" or "fixture:arch" (a loader by arch)
    got = request.getfixturevalue(name)
    return c, got(arch) if arch else got


# ---- helpers --------------------------------------------------------------------------------------


def _hashes(host) -> dict[str, str]:
    """Bit-exact content of every frozen weight."""
    return {k: hashlib.sha1(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in host.frozen_parameters().items()}


def _probe(host, seed: int = 0, b: int = 2):
    """Clean latents, grid noise levels and the noisy latents, on the host's device."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, host.latent_channels, 8, 8, generator=g).to(host.device)
    noise = torch.randn(b, host.latent_channels, 8, 8, generator=g).to(host.device)
    idx = torch.tensor([50, 700, 999, 300][:b])
    sigma = host.training_sigmas()[idx.to(host.device)]
    return x0, noise, sigma, idx


def _denoise(host, prompts, x, sigma, placeholder=None, vectors=None):
    cond = host.encode_text(prompts, placeholder, vectors)
    return host.denoise(x, sigma, cond).float()


def _a_weight(host, part: str = "unet", needle: str = "attn1.to_out.0.weight") -> str:
    names = [n for n in host.tunable_parameters(part) if n.endswith(needle)]
    assert names, f"no {needle} among the tunable parameters of {part}"
    return names[0]


# ---- the promises ---------------------------------------------------------------------------------


def test_protocols_detection_and_shape_facts(case):
    c, host = case
    assert isinstance(host, Host) and isinstance(host, Tunable) and isinstance(host, Exportable)
    fam = families.family(c.family)
    assert (host.info.family, host.info.prediction) == (c.family, c.prediction)
    assert [e.key for e in host.text_encoders()] == list(fam.encoder_keys)
    assert (host.latent_channels, host.latent_scale) == (fam.latent_channels, fam.latent_scale)
    assert host.latent_multiple >= 1 and host.latent_multiple & (host.latent_multiple - 1) == 0
    assert host.naming == c.adapter.naming(c.family)
    prefixes = (host.naming.unet_prefix, *host.naming.encoder_prefixes.values())
    for part in ("unet", *fam.encoder_keys):
        names = host.tunable_parameters(part)
        assert names and all(n.startswith(prefixes) for n in names), part


def test_training_context_leaves_inference_mode(case):
    c, host = case
    with c.adapter.node(), torch.no_grad():
        with host.training():
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            v = torch.zeros(2, requires_grad=True)
            (v * 2).sum().backward()
        assert not torch.is_grad_enabled()  # only inside
    assert v.grad is not None


def test_training_sigmas_are_the_discrete_schedule(case):
    c, host = case
    with c.adapter.node():
        s = host.training_sigmas()
    assert s.dtype == torch.float32 and s.ndim == 1 and len(s) == 1000 and s.device.type == host.device.type
    assert bool((s[1:] > s[:-1]).all()) and float(s[0]) > 0


def test_encode_and_decode_images(case):
    c, host = case
    images = torch.rand(2, 64, 48, 3)
    with c.adapter.node():
        z = host.encode_images(images)
        px = host.decode_latents(z)
    f = host.latent_scale
    assert z.shape == (2, host.latent_channels, 64 // f, 48 // f) and z.dtype == torch.float32 and not z.requires_grad
    assert px.shape == (2, 64, 48, 3) and px.device.type == "cpu" and 0 <= float(px.min()) <= float(px.max()) <= 1


def test_differentiable_decode_matches_and_reaches_the_latents(case):
    c, host = case
    before = _hashes(host)
    with c.adapter.node():
        z = host.encode_images(torch.rand(1, 64, 64, 3))
        plain = host.decode_latents(z)
        with host.training():
            zl = z.clone().requires_grad_(True)
            px = host.decode_latents(zl, differentiable=True)
            px.mean().backward()
    assert px.shape == plain.shape and px.device.type == host.device.type and px.requires_grad
    torch.testing.assert_close(px.detach().cpu(), plain, atol=c.adapter.decode_atol, rtol=0)
    assert zl.grad is not None and bool(torch.isfinite(zl.grad).all()) and float(zl.grad.abs().sum()) > 0
    assert all(p.grad is None for p in host.frozen_parameters().values())  # never the VAE's weights
    assert _hashes(host) == before


def test_token_embeddings_and_placeholder_checks(case):
    c, host = case
    widths = {e.key: e.width for e in host.text_encoders()}
    with c.adapter.node():
        emb = host.token_embeddings("red apple")
        for good in (PH, "sks-cat", "xyzw", "<my-thing>"):
            host.check_placeholder(good)
        for bad in ("cat", "Cat", " dog ", "!", "", "   "):  # existing words, empty
            with pytest.raises(ValueError):
                host.check_placeholder(bad)
    assert set(emb) == set(widths)
    for key, e in emb.items():
        assert e.dtype == torch.float32 and e.shape == (2, widths[key]) and not e.requires_grad


def test_placeholder_with_a_words_embeddings_is_that_word(case):
    """One vector ("cat") or several ("red apple"), the placeholder once or twice, in the middle or
    at the end: the spliced conditioning is the word's own; a prompt without the placeholder
    ignores the vectors."""
    c, host = case
    with c.adapter.node(), host.training(), torch.no_grad():
        x0, noise, sigma, _ = _probe(host)
        x = x0 + noise * sigma.view(-1, 1, 1, 1)
        pairs = [(["a photo of cat", "cat on a table"], [f"a photo of {PH}", f"{PH} on a table"], "cat"),
                 (["red apple and red apple, painted"] * 2, [f"{PH} and {PH}, painted"] * 2, "red apple"),
                 (["a photo of a dog"] * 2, ["a photo of a dog"] * 2, "cat")]
        for words, spliced, init in pairs:
            vectors = host.token_embeddings(init)
            torch.testing.assert_close(_denoise(host, spliced, x, sigma, PH, vectors),
                                       _denoise(host, words, x, sigma), atol=1e-4, rtol=1e-4)


def test_gradients_reach_every_encoders_vectors_and_no_weight(case):
    """Trainable vectors (with SDXL-style size conditioning in the batch) change the output, get
    finite non-zero gradients in every encoder, and an optimizer step on them changes no weight."""
    c, host = case
    before = _hashes(host)
    with c.adapter.node(), host.training():
        x0, noise, sigma, _ = _probe(host)
        x = x0 + noise * sigma.view(-1, 1, 1, 1)
        prompts = [f"a photo of {PH}", f"{PH} on a table, {PH}"]
        word = _denoise(host, prompts, x, sigma, PH, host.token_embeddings("red apple")).detach()
        vectors = {k: (v + 0.5 * torch.randn_like(v)).requires_grad_(True)
                   for k, v in host.token_embeddings("red apple").items()}
        meta = [ImageMeta((64, 64)), ImageMeta((80, 72), (8, 4))]
        moved = host.denoise(x, sigma, host.encode_text(prompts, PH, vectors, meta))
        objective.native_error(host, moved, x0, sigma).mean().backward()
        torch.optim.AdamW(list(vectors.values()), lr=1e-2).step()
    assert float((moved.detach().float() - word).abs().max()) > 1e-5
    for key, v in vectors.items():
        assert v.grad is not None and bool(torch.isfinite(v.grad).all()) and float(v.grad.abs().sum()) > 0, key
    assert all(p.grad is None and not p.requires_grad for p in host.frozen_parameters().values())
    assert _hashes(host) == before


def test_native_loss_is_the_networks_own_loss(case):
    """``objective.native_error`` from the x0 estimate equals the MSE of the raw network output
    against the model's own target (eps: the noise; v: (noise - sigma x0) / sqrt(sigma^2 + 1))."""
    c, host = case
    with c.adapter.node(), host.training(), torch.no_grad():
        x0, noise, sigma, idx = _probe(host, seed=3)
        s = sigma.view(-1, 1, 1, 1)
        cond = host.encode_text(["a photo of a cat", "a dog"])
        native = objective.native_error(host, host.denoise(x0 + noise * s, sigma, cond), x0, sigma)
        out = c.adapter.raw(host, (x0 + noise * s) / torch.sqrt(s ** 2 + 1), idx.to(host.device), cond)
    target = noise if c.prediction == "eps" else (noise - s * x0) / torch.sqrt(s ** 2 + 1)
    direct = ((out.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(native.double(), direct, rtol=2e-4, atol=1e-7)


def test_patches_change_the_output_and_leave_weights_bit_identical(case):
    c, host = case
    before = _hashes(host)
    name = _a_weight(host)
    with c.adapter.node(), host.training(), torch.no_grad():
        x0, noise, sigma, _ = _probe(host)
        x = x0 + noise * sigma.view(-1, 1, 1, 1)
        plain = _denoise(host, PROMPTS, x, sigma)
        with host.parameter_patches({name: lambda w: w + 0.5}):
            patched = _denoise(host, PROMPTS, x, sigma)
        after = _denoise(host, PROMPTS, x, sigma)
        with pytest.raises(ValueError):
            with host.parameter_patches({"no.such.weight": lambda w: w}):
                pass
    assert float((patched - plain).detach().abs().max()) > 1e-4
    assert torch.equal(after, plain)
    assert _hashes(host) == before


def _delta_for(host, name: str, seed: int = 1) -> torch.Tensor:
    w = host.tunable_parameters("unet")[name]
    return 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))


def _patched_output(host, deltas: dict, x, sigma) -> torch.Tensor:
    fns = {n: (lambda w, d=d: w + d.to(w.device, w.dtype)) for n, d in deltas.items()}
    with host.parameter_patches(fns):
        return _denoise(host, PROMPTS, x, sigma)


def _applied_vs_patched(c: Case, host, deltas: dict, apply: Callable[[], Any]):
    """(output of the model ``apply()`` returns, output of the host patched with ``deltas``)."""
    with c.adapter.node(), host.training(), torch.no_grad():
        x0, noise, sigma, _ = _probe(host)
        x = x0 + noise * sigma.view(-1, 1, 1, 1)
        expected = _patched_output(host, deltas, x, sigma)
        other = c.adapter.as_host(apply(), host)
        with other.training():
            return _denoise(other, PROMPTS, x, sigma), expected


def _own_output(c: Case, host) -> torch.Tensor:
    with c.adapter.node(), host.training(), torch.no_grad():
        x0, noise, sigma, _ = _probe(host)
        return _denoise(host, PROMPTS, x0 + noise * sigma.view(-1, 1, 1, 1), sigma)


def test_with_deltas_equals_the_patched_model(case):
    """The returned model computes as the host patched with the deltas; the host itself still
    computes what it did (ComfyUI shares one set of weights between a MODEL and its clones and
    patches them in place while a clone runs, so the promise is about outputs, not storage)."""
    c, host = case
    plain = _own_output(c, host)
    name = _a_weight(host)
    deltas = {name: _delta_for(host, name)}
    got, expected = _applied_vs_patched(c, host, deltas, lambda: host.with_deltas(deltas))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(_own_output(c, host), plain)


def test_with_lora_applies_what_a_loader_applies(case):
    """A kohya file's tensors through ``with_lora`` equal the delta ``strength * alpha / rank * up @ down``."""
    from likeness.trainers.formats import kohya_lora

    c, host = case
    plain = _own_output(c, host)
    name = _a_weight(host)
    w = host.tunable_parameters("unet")[name]
    g = torch.Generator().manual_seed(2)
    down, up, alpha = torch.randn(4, w.shape[1], generator=g) * 0.2, torch.randn(w.shape[0], 4, generator=g) * 0.2, 2.0
    sd = kohya_lora.lora_state_dict({name[: -len(".weight")]: (down, up, alpha)}, family=c.family,
                                     dtype=torch.float32, layout=host.unet_layout(), naming=host.naming)
    for strength in (1.0, 0.5):
        deltas = {name: kohya_lora.weight_delta(down, up, alpha) * strength}
        got, expected = _applied_vs_patched(c, host, deltas, lambda: host.with_lora(sd, strength_model=strength))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(_own_output(c, host), plain)


def test_saved_checkpoint_reloads_as_the_tuned_model(case, tmp_path):
    c, host = case
    name = _a_weight(host)
    deltas = {name: _delta_for(host, name, seed=4)}
    path = tmp_path / "tuned.safetensors"
    with c.adapter.node(), host.training(), torch.no_grad():
        x0, noise, sigma, _ = _probe(host)
        x = x0 + noise * sigma.view(-1, 1, 1, 1)
        expected = _patched_output(host, deltas, x, sigma)
        host.save_checkpoint(path, deltas, {"likeness": "contract"})
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p != path]  # no temp file left
    other = c.adapter.reload(path, host, tmp_path / "reload")
    with c.adapter.node(), other.training(), torch.no_grad():
        got = _denoise(other, PROMPTS, x, sigma)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


# ---- module branches (how LoRA trains) ------------------------------------------------------------


def _bias_of(name: str) -> str:
    return name[: -len(".weight")] + ".bias"


def test_a_branch_changes_exactly_its_layer_and_trains_what_it_closes_over(case):
    """``module_branches``: a branch adding a constant is that layer's bias moved by the constant, a
    branch adding ``x @ D.T`` is its weight moved by ``D`` (the branch sees the layer's own input and
    output); gradients reach the tensors the branch closes over and never a weight; afterwards the
    model computes bit-identically, with its weights untouched; a name that is not a branchable
    weight is refused before anything is hooked."""
    c, host = case
    before = _hashes(host)
    name = _a_weight(host)
    w = host.tunable_parameters("unet")[name]
    d = 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    with c.adapter.node(), host.training():
        x0, noise, sigma, _ = _probe(host)
        x = x0 + noise * sigma.view(-1, 1, 1, 1)
        with torch.no_grad():
            plain = _denoise(host, PROMPTS, x, sigma)
            with host.parameter_patches({_bias_of(name): lambda b: b + 0.25}):
                bias_moved = _denoise(host, PROMPTS, x, sigma)
            weight_moved = _patched_output(host, {name: d}, x, sigma)
            with host.module_branches({name: lambda xi, y: y + xi @ d.to(xi.device, xi.dtype).T}):
                via_input = _denoise(host, PROMPTS, x, sigma)
        k = torch.zeros((), device=host.device, requires_grad=True)
        with host.module_branches({name: lambda xi, y: y + (0.25 + k).to(y.dtype)}):
            branched = _denoise(host, PROMPTS, x, sigma)
            objective.native_error(host, branched, x0, sigma).mean().backward()
        with torch.no_grad():
            after = _denoise(host, PROMPTS, x, sigma)
        for bad in ("no.such.weight", _bias_of(name)):
            with pytest.raises(ValueError), host.module_branches({bad: lambda xi, y: y}):
                pass
    torch.testing.assert_close(branched.detach(), bias_moved, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(via_input, weight_moved, atol=1e-4, rtol=1e-4)
    assert float((bias_moved - plain).detach().abs().max()) > 1e-4
    assert k.grad is not None and bool(torch.isfinite(k.grad)) and float(k.grad.abs()) > 0
    assert all(p.grad is None and not p.requires_grad for p in host.frozen_parameters().values())
    assert torch.equal(after, plain)
    assert _hashes(host) == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_small_lora_change_reaches_the_low_precision_output(case, dtype):
    """A LoRA (rank 4, fp32 factors) whose change is 1e-4 of each adapted weight's norm changes
    what a bf16/fp16 model computes, and its gradients reach both factors: the adapter enters as a
    branch, rounded against the layer's output, never merged into (and rounded against) the weight."""
    from likeness.trainers.lora import LoraSet, target_weights

    c, _ = case
    host = c.adapter.in_dtype(c, _, dtype)
    if host.compute_dtype != dtype:  # ComfyUI on the CPU stores bf16/fp16 but computes in fp32
        pytest.skip(f"{c.id} computes in {host.compute_dtype} on {host.device.type} when stored in {dtype}")
    params = host.tunable_parameters("unet")
    lora = LoraSet({n: params[n] for n in target_weights(params, "attention")}, 4, 4.0, device=host.device, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, a in lora.adapters.items():
            a.up.copy_(torch.randn(a.up.shape, generator=g))
            a.up.mul_(1e-4 * params[n].float().norm() / a.delta().norm())
    with c.adapter.node(), host.training():
        x0, noise, sigma, _ = _probe(host)
        x = x0 + noise * sigma.view(-1, 1, 1, 1)
        with torch.no_grad():
            plain = _denoise(host, PROMPTS, x, sigma)
        with host.module_branches(lora.branches()):
            moved = _denoise(host, PROMPTS, x, sigma)
            objective.native_error(host, moved, x0, sigma).mean().backward()
    assert not torch.equal(moved.detach(), plain)
    for p in lora.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and bool(torch.isfinite(p.grad).all())
    assert any(float(p.grad.abs().sum()) > 0 for p in lora.parameters())
