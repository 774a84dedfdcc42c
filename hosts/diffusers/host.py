"""The seam (``trainers.seam``: ``Host``, ``Tunable``, ``Exportable``) for Stable Diffusion 1.x /
2.x / XL loaded with diffusers.

Used by the command line and by the tests (which build tiny diffusers models).  Two ways in:

* ``DiffusersHost.from_components(unet, vae, tokenizers, text_encoders, scheduler)`` - modules
  already built (tests, or a caller holding a pipeline);
* ``DiffusersHost.load(path)`` - a diffusers folder (``model_index.json``, ``folder.py``) or a
  single-file ``.safetensors`` / ``.ckpt`` checkpoint (``single_file.py``), strictly offline: the
  architecture comes from the configs shipped in ``hosts/assets/`` and pickles are never executed.

Noise convention (k-diffusion, Karras et al. 2022, "Elucidating the Design Space ..."): a DDPM
timestep ``t`` with cumulative alpha ``a_t`` is the noise level ``sigma_t = sqrt((1 - a_t) / a_t)``,
and the scheduler's ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` is ``c_in * (x0 + sigma eps)`` with
``c_in = 1 / sqrt(sigma^2 + 1)``.  ``denoise`` therefore feeds the UNet exactly what diffusers
training feeds it and turns its output (eps or v) into an x0 estimate; ``output_scale`` is that
output's coefficient, so the trainer's ``((x0_hat - x0) / output_scale)^2`` is the model's own
eps-MSE or v-MSE.

A training step does nothing it could do once: the weights are ordinary frozen parameters moved to
the device in the compute dtype at construction (no per-step copy or reload, so this host has one
path, ComfyUI's "fast" one); a patch computes only the patched weight; each prompt is tokenized
once per host (``text.tokenize``'s cache) and SDXL's size ids once per conditioning, so a reused
conditioning (DreamBooth's frozen text) costs nothing after its first step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from ...trainers.families import family as family_spec
from ...trainers.seam import DIFFUSERS_NAMING, ImageMeta, ModelInfo, ParameterNaming, TextEncoderInfo
from . import formats
from .folder import infer_family, load_folder, offline, prediction_from_scheduler
from .single_file import load_single_file
from .text import DiffusersCond, run_encoder, tokenize

PLACEHOLDER_ADVICE = "pick a rare made-up word such as 'sks-cat'"


def pick_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA that has it, fp16 on older CUDA, fp32 elsewhere (CPU kernels are fp32-fast)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _short_hash(path: Path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def _sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous timestep for ``sigma``: linear interpolation in log-sigma between the two nearest
    training levels (k-diffusion's ``DiscreteSchedule.sigma_to_t``); exact for training sigmas."""
    log_sigma = sigma.to(log_sigmas.dtype).log()
    dists = log_sigma - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
    return (1 - w) * low + w * high


_TUNABLE_MODULES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


class _Patch(torch.nn.Module):
    """A parametrization that computes ``fn(original)``, or ``fn(master)`` from the weight's
    full-precision stored copy when the computing copy lost precision (then the result is cast
    once to the compute dtype: a small fp32 delta added to the master is not rounded twice)."""

    def __init__(self, fn, master: torch.Tensor | None = None):
        super().__init__()
        self.fn, self.master = fn, master

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.master is None:
            return self.fn(original)
        return self.fn(self.master.float()).to(original.dtype)


def _lost_in_cast(before: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``before`` (a module's state dict before its cast to the compute dtype)
    that the cast changed the dtype of: the weights as loaded, which a fine-tune starts from and
    an export writes back in their own dtype.  Kept by reference; a module whose dtype did not
    change keeps nothing."""
    after = module.state_dict()
    return {k: v for k, v in before.items()
            if k in after and v.is_floating_point() and v.dtype != after[k].dtype}


class _Stored:
    """A module seen through its full-precision stored tensors (``ldm_export`` reads ``config``
    and ``state_dict()``): what a checkpoint export starts from."""

    def __init__(self, module: torch.nn.Module, source: dict[str, torch.Tensor]):
        self.config, self._module, self._source = module.config, module, source

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self._source.get(k, v) for k, v in self._module.state_dict().items()}


def _branchable(module: torch.nn.Module) -> bool:
    """A layer whose output a LoRA-style branch can extend: Linear, or a 1x1 conv."""
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def _branch_hook(fn):
    """A forward hook returning ``fn(input, output)``: the layer's output through the branch."""
    def hook(_module, args, out):
        return fn(args[0], out)
    return hook


class DiffusersHost:
    """``trainers.seam.Host`` (and ``Tunable``, ``Exportable``) over diffusers modules (SD1.x eps,
    SD2.x eps/v, SDXL)."""

    latent_channels: int
    latent_scale: int
    latent_multiple: int

    def __init__(self, unet, vae, tokenizers, text_encoders, scheduler, *, family: str,
                 prediction: str, name: str, device: torch.device, dtype: torch.dtype,
                 file: Path | None = None):
        spec = family_spec(family)
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
        n_enc = len(spec.encoders)
        if len(tokenizers) != n_enc or len(text_encoders) != n_enc:
            raise ValueError(f"{family} needs {n_enc} tokenizer(s) and text encoder(s), "
                             f"got {len(tokenizers)} and {len(text_encoders)}")
        if family == "sdxl" and not hasattr(text_encoders[1], "text_projection"):
            raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection (pooled output)")
        self.device, self.compute_dtype = torch.device(device), dtype
        self.family, self.prediction, self._encoders = family, prediction, spec.encoders
        given = {"unet": unet, "vae": vae, **{e.component: te for e, te in zip(spec.encoders, text_encoders)}}
        before = {k: m.state_dict() for k, m in given.items()}  # the weights as loaded (references)
        self.unet = self._freeze(unet, dtype)
        self.vae = self._freeze(vae, self._vae_dtype(vae, dtype))
        self.text_encoder_modules = [self._freeze(te, dtype) for te in text_encoders]
        #: per component, the loaded tensors whose compute copy has another dtype (bf16 from fp16)
        self._source = {k: _lost_in_cast(before[k], m) for k, m in given.items()}
        self.tokenizers = list(tokenizers)
        self._token_rows: list[dict] = [{} for _ in self.tokenizers]  # per tokenizer: prompt -> ids
        self.latent_channels = int(unet.config.in_channels)
        self.latent_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_multiple = 2 ** (len(unet.config.block_out_channels) - 1)  # one halving per level
        self._info = ModelInfo(family=family, prediction=prediction, name=name)
        self._file = file
        self._init_sigmas(scheduler)

    # -- construction ------------------------------------------------------------------------

    def _freeze(self, module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        # eval(): no dropout; requires_grad False: gradients flow through, never into, the weights.
        # nn.Module.to, not diffusers' override: that one warns about fp32-kept modules SD has none of
        module.eval().requires_grad_(False)
        return torch.nn.Module.to(module, self.device, dtype)

    @staticmethod
    def _vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
        # SDXL's VAE overflows in fp16 (its config says force_upcast); bf16 has the range it needs
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            return torch.float32
        return dtype

    def _init_sigmas(self, scheduler) -> None:
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"{type(scheduler).__name__} has no discrete DDPM schedule "
                             "(alphas_cumprod); only SD1/SD2/SDXL-style models are supported")
        # float64 for the sigma -> t lookup (exact timesteps for training sigmas); MPS has no fp64
        table = torch.float32 if self.device.type == "mps" else torch.float64
        # (clamped: a zero-terminal-SNR schedule ends at alpha 0, i.e. sigma infinity)
        ac = scheduler.alphas_cumprod.to(torch.float64).clamp(min=torch.finfo(torch.float32).tiny)
        sigmas = ((1 - ac) / ac).sqrt()
        self._sigmas = sigmas.to(self.device, table)
        self._log_sigmas = self._sigmas.log()

    @classmethod
    def from_components(cls, unet, vae, tokenizers, text_encoders, scheduler, family: str | None = None,
                        name: str = "components", *, prediction: str | None = None,
                        device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> "DiffusersHost":
        """Wrap built modules.  ``family`` is inferred when None (two encoders: sdxl; an OpenCLIP-style
        gelu encoder: sd2; else sd1); ``prediction`` from ``scheduler.config.prediction_type``.
        ``device``/``dtype`` default to the UNet's own.  The modules are frozen in place."""
        family = family or infer_family(unet, text_encoders)
        prediction = prediction or prediction_from_scheduler(scheduler)
        first = next(unet.parameters())
        return cls(unet, vae, tokenizers, text_encoders, scheduler, family=family,
                   prediction=prediction, name=name, device=torch.device(device or first.device),
                   dtype=dtype or first.dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None, *, prediction: str = "auto", family: str | None = None,
             config_dir: str | os.PathLike | None = None) -> "DiffusersHost":
        """Load a diffusers folder or a single-file checkpoint, offline.

        ``prediction``: "auto" (folders: the scheduler's; single files: eps for SD1/SDXL, for SD2
        ComfyUI's test - v unless the UNet looks eps-trained), or "eps"/"v" to override.
        ``family``: override detection ("sd1", "sd2", "sdxl").  ``config_dir``: a diffusers-layout
        config folder to use instead of the shipped one (single files only).
        """
        path = Path(path)
        if prediction not in ("auto", "eps", "v"):
            raise ValueError(f"prediction must be 'auto', 'eps' or 'v', not {prediction!r}")
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or pick_compute_dtype(device)
        with offline():
            if path.is_dir():
                parts = load_folder(path, family)
            else:
                parts = load_single_file(path, family, prediction, config_dir)
        found = parts.pop("prediction")
        return cls(**parts, prediction=found if prediction == "auto" else prediction, name=path.name,
                   device=device, dtype=dtype, file=None if path.is_dir() else path)

    # -- what the trainers read --------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        # the hash reads the whole file (GBs): only on first use, and only for single files
        if self._file is not None and self._info.hash is None:
            self._info.hash = _short_hash(self._file)
        return self._info

    @property
    def naming(self) -> ParameterNaming:
        return DIFFUSERS_NAMING[self.family]

    @contextlib.contextmanager
    def training(self):
        """Outside ComfyUI nothing runs under inference mode, so a training run needs only grad
        on (its caller may have turned it off)."""
        with torch.enable_grad():
            yield self

    def text_encoders(self) -> Sequence[TextEncoderInfo]:
        # widths from the modules, not the family table: the tests' tiny encoders are narrower
        return [TextEncoderInfo(e.key, int(te.config.hidden_size))
                for e, te in zip(self._encoders, self.text_encoder_modules)]

    def training_sigmas(self) -> torch.Tensor:
        return self._sigmas.float()

    def frozen_parameters(self) -> dict[str, torch.Tensor]:
        """The live parameters (for checks: do not modify), prefixed by component."""
        parts = {"unet": self.unet, "vae": self.vae}
        parts.update({e.component: te for e, te in zip(self._encoders, self.text_encoder_modules)})
        return {f"{p}.{n}": t for p, m in parts.items() for n, t in m.named_parameters()}

    # -- placeholder words -------------------------------------------------------------------

    def check_placeholder(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"The placeholder word is empty; {PLACEHOLDER_ADVICE}.")
        for enc, tok in zip(self._encoders, self.tokenizers):
            ids = tok(name, add_special_tokens=False).input_ids
            if len(ids) == 1:
                word = tok.convert_ids_to_tokens(ids)[0]
                raise ValueError(
                    f"The placeholder {name!r} is already the word {word!r} of the {enc.key} text "
                    "encoder's vocabulary: training it would change what every prompt with that word "
                    f"means, and WebUIs would load the embedding in that word's place; "
                    f"{PLACEHOLDER_ADVICE}.")

    def token_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        out = {}
        for enc, tok, te in zip(self._encoders, self.tokenizers, self.text_encoder_modules):
            ids = torch.tensor(tok(text, add_special_tokens=False).input_ids, dtype=torch.long)
            table = te.get_input_embeddings().weight
            out[enc.key] = table[ids.to(table.device)].detach().to(self.device, torch.float32).clone()
        return out

    # -- images ------------------------------------------------------------------------------

    def _vae_scaling(self) -> tuple[float, float]:
        """(scale, shift): model-space latent = (VAE latent - shift) * scale."""
        cfg = self.vae.config
        return cfg.scaling_factor, getattr(cfg, "shift_factor", None) or 0.0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior *mean*, not a sample: the KL-VAE's posterior std is tiny, so sampling only adds
        noise that differs per call; the mean makes cached latents deterministic and reproducible
        (A1111's "deterministic" option).  fp32 out, no gradients."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] (ComfyUI IMAGE), got {tuple(images.shape)}")
        h, w, f = images.shape[1], images.shape[2], self.latent_scale
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a multiple of {f}; crop or resize to "
                             f"{h // f * f}x{w // f * f} (or the next multiple of {f}) first")
        scale, shift = self._vae_scaling()
        with torch.no_grad():
            x = images.to(self.device, self.vae.dtype).permute(0, 3, 1, 2) * 2 - 1
            z = self.vae.encode(x).latent_dist.mean
        return ((z - shift) * scale).float()

    def decode_latents(self, latents: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
        """The same computation either way; ``differentiable`` only keeps the graph (SeedSelect's
        semantic loss back-propagates through the VAE to the latents) and the device."""
        scale, shift = self._vae_scaling()
        with contextlib.nullcontext() if differentiable else torch.no_grad():
            z = latents.to(self.device, self.vae.dtype) / scale + shift
            x = self.vae.decode(z).sample
            pixels = ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        return pixels if differentiable else pixels.cpu()

    # -- text --------------------------------------------------------------------------------

    def encode_text(self, prompts: Sequence[str], placeholder: str | None = None,
                    vectors: dict[str, torch.Tensor] | None = None,
                    meta: Sequence[ImageMeta] | None = None) -> DiffusersCond:
        prompts = self._check_prompts(prompts, placeholder, vectors, meta)
        keys = [e.key for e in self._encoders]
        n = vectors[keys[0]].shape[0] if (placeholder and vectors) else 0  # same n for all (checked)
        outs = []
        for key, tok, te, rows in zip(keys, self.tokenizers, self.text_encoder_modules, self._token_rows):
            tokens = tokenize(tok, prompts, placeholder if n else None, n, self.device, rows)
            outs.append(run_encoder(te, tokens, vectors[key] if n else None, self.family == "sdxl"))
        if self.family != "sdxl":
            return DiffusersCond(context=outs[0].last_hidden_state)
        # SDXL: penultimate layer of both encoders side by side; pooled = the bigG projection
        context = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        return DiffusersCond(context=context, pooled=outs[1].text_embeds,
                             meta=tuple(meta) if meta is not None else None)

    def _check_prompts(self, prompts, placeholder, vectors, meta) -> list[str]:
        if isinstance(prompts, str):
            raise TypeError("encode_text takes a list of prompts, not a single string")
        prompts = list(prompts)
        if meta is not None and len(meta) != len(prompts):
            raise ValueError(f"{len(meta)} ImageMeta for {len(prompts)} prompts")
        if not placeholder or vectors is None:
            if placeholder and any(placeholder in p for p in prompts):
                raise ValueError(f"prompts contain {placeholder!r} but no vectors were given for it")
            return prompts
        sizes = set()
        for info in self.text_encoders():
            v = vectors.get(info.key)
            if v is None or v.ndim != 2 or v.shape[1] != info.width or v.shape[0] < 1:
                got = None if v is None else tuple(v.shape)
                raise ValueError(f"vectors[{info.key!r}] must be [n, {info.width}], got {got}")
            sizes.add(v.shape[0])
        if len(sizes) > 1:  # SDXL's two sequences are concatenated position by position
            raise ValueError(f"every encoder needs the same number of vectors, got {sorted(sizes)}")
        return prompts

    # -- denoiser ----------------------------------------------------------------------------

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: DiffusersCond) -> torch.Tensor:
        """x0 estimate (k-diffusion's CompVisDenoiser / CompVisVDenoiser), in fp32 (fp64 if x is)."""
        if sigma.ndim != 1 or sigma.shape[0] != x.shape[0] or len(cond) != x.shape[0]:
            raise ValueError(f"batch mismatch: x {tuple(x.shape)}, sigma {tuple(sigma.shape)}, "
                             f"cond of {len(cond)} prompts")
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(self.device, dtype)
        s = sigma.to(x.device, dtype).view(-1, 1, 1, 1)
        t = _sigma_to_t(sigma.to(self.device), self._log_sigmas)
        out = self._unet(x / (s**2 + 1).sqrt(), t, cond).to(dtype)
        if self.prediction == "eps":
            return x - s * out
        return x / (s**2 + 1) - out * s / (s**2 + 1).sqrt()

    def _unet(self, x_in: torch.Tensor, t: torch.Tensor, cond: DiffusersCond) -> torch.Tensor:
        extra = {}
        if cond.pooled is not None:
            pixel_hw = (x_in.shape[-2] * self.latent_scale, x_in.shape[-1] * self.latent_scale)
            extra["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids(pixel_hw)}
        return self.unet(x_in.to(self.device, self.compute_dtype), t,
                         encoder_hidden_states=cond.context, return_dict=False, **extra)[0]

    def output_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return -sigma
        return -sigma / (sigma**2 + 1).sqrt()

    # -- weights (seam.Tunable) --------------------------------------------------------------

    def _parts(self) -> dict[str, tuple[str, torch.nn.Module]]:
        """part key -> (name prefix, module): "unet", and each encoder key."""
        out = {"unet": ("unet", self.unet)}
        for e, te in zip(self._encoders, self.text_encoder_modules):
            out[e.key] = (e.component, te)
        return out

    def tunable_parameters(self, part: str) -> dict[str, torch.Tensor]:
        parts = self._parts()
        if part not in parts:
            raise ValueError(f"no part {part!r} in this {self.family} model; have {', '.join(parts)}")
        from torch.nn.utils import parametrize

        prefix, root = parts[part]
        out = {}
        for mname, m in root.named_modules():
            if isinstance(m, _TUNABLE_MODULES):
                for pname in ("weight", "bias"):
                    if parametrize.is_parametrized(m, pname):  # patched right now: the original
                        prm = m.parametrizations[pname].original
                    else:
                        prm = m._parameters.get(pname)
                    if prm is not None:
                        out[f"{prefix}.{mname}.{pname}"] = prm.detach()
        return out

    def _all_tunable(self) -> dict[str, torch.Tensor]:
        return {n: p for part in self._parts() for n, p in self.tunable_parameters(part).items()}

    @contextlib.contextmanager
    def parameter_patches(self, fns: dict):
        """Each patched parameter gets a ``torch.nn.utils.parametrize`` parametrization computing
        ``fn(p)``; removing it (``leave_parametrized=False``) puts the original Parameter object
        back, so the host's weights are the same tensors, bit for bit, afterwards."""
        from torch.nn.utils import parametrize

        owners = self._owners(fns)
        done = []
        try:
            for name, (module, pname) in owners.items():
                master = self._master(name)
                master = master.to(self.device) if master is not None else None
                parametrize.register_parametrization(module, pname, _Patch(fns[name], master), unsafe=True)
                done.append((module, pname))
            yield
        finally:
            for module, pname in reversed(done):
                parametrize.remove_parametrizations(module, pname, leave_parametrized=False)

    @contextlib.contextmanager
    def module_branches(self, fns: dict):
        """Each branch is a forward hook on the layer owning the weight (a Linear or a 1x1 conv)
        whose result replaces the layer's output; every name is checked before any hook is added,
        and the hooks are removed in ``finally``, so the modules are exactly as before afterwards."""
        owners = self._owners(fns)
        for name, (module, pname) in owners.items():
            if pname != "weight" or not _branchable(module):
                raise ValueError(f"cannot branch {name!r}: only the weight of a Linear or 1x1 conv layer")
        handles = []
        try:
            for name, (module, _) in owners.items():
                handles.append(module.register_forward_hook(_branch_hook(fns[name])))
            yield
        finally:
            for h in handles:
                h.remove()

    def _owners(self, names) -> dict[str, tuple[torch.nn.Module, str]]:
        roots = {prefix: root for prefix, root in self._parts().values()}
        out = {}
        for name in names:
            prefix, _, rest = name.partition(".")
            mname, _, pname = rest.rpartition(".")
            if prefix not in roots:
                raise ValueError(f"cannot patch {name!r}: no component {prefix!r}")
            module = roots[prefix].get_submodule(mname) if mname else roots[prefix]
            if not isinstance(getattr(module, pname, None), torch.Tensor):
                raise ValueError(f"cannot patch {name!r}: no such parameter")
            out[name] = (module, pname)
        return out

    def _master(self, name: str) -> torch.Tensor | None:
        """Parameter ``name`` as loaded when its compute copy has another dtype, else None (the
        compute copy is the weight)."""
        prefix, _, rest = name.partition(".")
        return self._source.get(prefix, {}).get(rest)

    def unet_layout(self):
        return formats.unet_layout(self.unet.config)

    @contextlib.contextmanager
    def gradient_checkpointing(self):
        was = bool(getattr(self.unet, "gradient_checkpointing", False))
        self.unet.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if not was:
                self.unet.disable_gradient_checkpointing()

    # -- results (seam.Exportable) -----------------------------------------------------------

    def _merged(self, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{name: weight + delta}`` for each delta (names as ``tunable_parameters``), summed in
        fp32 from the full-precision weight and rounded once to the dtype it was loaded in."""
        params = self._all_tunable()
        unknown = sorted(set(deltas) - set(params))
        if unknown:
            raise ValueError(f"deltas for parameters this model does not have: {unknown[:3]}")
        out = {}
        for n, d in deltas.items():
            w = self._master(n)
            w = params[n] if w is None else w
            out[n] = (w.float() + d.to(w.device).float()).to(w.dtype)
        return out

    def with_deltas(self, deltas: dict[str, torch.Tensor]) -> "DiffusersHost":
        """A new host over copies of the modules ``deltas`` change, with them added (in fp32, then
        rounded once to the weights' dtype, as a checkpoint merge does); unchanged modules and this
        host are shared, never written.  It is no longer the loaded file: its info has no hash."""
        merged = self._merged(deltas)
        touched = {name.partition(".")[0] for name in merged}
        new = copy.copy(self)
        new._info, new._file = dataclasses.replace(self._info, hash=None, extra=dict(self._info.extra)), None
        new.unet = copy.deepcopy(self.unet) if "unet" in touched else self.unet
        new.text_encoder_modules = [copy.deepcopy(te) if e.component in touched else te
                                    for e, te in zip(self._encoders, self.text_encoder_modules)]
        new._source = {k: dict(v) for k, v in self._source.items()}
        with torch.no_grad():
            for name, (module, pname) in new._owners(merged).items():
                getattr(module, pname).copy_(merged[name])
                prefix, _, rest = name.partition(".")
                if rest in new._source.get(prefix, {}):  # the new full-precision weight
                    new._source[prefix][rest] = merged[name]
        return new

    def with_lora(self, lora_state_dict: dict[str, torch.Tensor], strength_model: float = 1.0,
                  strength_clip: float = 1.0) -> "DiffusersHost":
        """A new host with a kohya LoRA merged as ComfyUI's LoraLoader and A1111 apply a file:
        ``W + strength * alpha / rank * up @ down`` (fp32, rounded once to the weights' dtype);
        ``strength_model`` for the UNet, ``strength_clip`` for the text encoders.  Every layer of
        the LoRA must patch a module of this model."""
        modules = [n.removesuffix(".weight") for n in self._all_tunable() if n.endswith(".weight")]
        deltas = formats.lora_weight_deltas(lora_state_dict, family=self.family, layout=self.unet_layout(),
                                            module_names=modules)
        unet = self.naming.unet_prefix
        return self.with_deltas({f"{n}.weight": d * (strength_model if n.startswith(unet) else strength_clip)
                                 for n, d in deltas.items()})

    def save_checkpoint(self, path: str | os.PathLike, deltas: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> Path:
        """The model with ``deltas`` added (names as ``tunable_parameters``), as one single-file
        checkpoint in the original layout (``hosts/ldm_export``), written atomically.  Every
        tensor is written from the weights as loaded, in the precision it was loaded in (not the
        compute copy): a weight no delta changes is written back bit-identical, a changed one is
        the fp32 sum rounded once."""
        def stored(component: str, module):
            return _Stored(module, self._source.get(component, {}))

        parts = dict(unet=stored("unet", self.unet), vae=stored("vae", self.vae), family=self.family,
                     text_encoders=[stored(e.component, te) for e, te in zip(self._encoders, self.text_encoder_modules)])
        return formats.write_checkpoint(Path(path), parts, self._merged(deltas), None, metadata)


__all__ = ["DiffusersHost", "pick_compute_dtype", "default_device", "PLACEHOLDER_ADVICE"]
