"""The seam (``trainers.seam.Host``) for Stable Diffusion 1.x / 2.x / XL loaded with diffusers.

Used by the command line and by the tests (which build tiny diffusers models).  Two ways in:

* ``DiffusersHost.from_components(unet, vae, tokenizers, text_encoders, scheduler)`` - modules
  already built (tests, or a caller holding a pipeline);
* ``DiffusersHost.load(path)`` - a diffusers folder (``model_index.json``) or a single-file
  ``.safetensors`` / ``.ckpt`` checkpoint, strictly offline: the architecture comes from the
  configs shipped in ``hosts/assets/`` and pickles are never executed (``weights_only=True``).

Noise convention (k-diffusion, Karras et al. 2022, "Elucidating the Design Space ..."): a DDPM
timestep ``t`` with cumulative alpha ``a_t`` is the noise level ``sigma_t = sqrt((1 - a_t) / a_t)``,
and the scheduler's ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` is ``c_in * (x0 + sigma eps)`` with
``c_in = 1 / sqrt(sigma^2 + 1)``.  ``denoise`` therefore feeds the UNet exactly what diffusers
training feeds it and turns its output (eps or v) into an x0 estimate; ``output_scale`` is that
output's coefficient, so the trainer's ``((x0_hat - x0) / output_scale)^2`` is the model's own
eps-MSE or v-MSE.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..trainers.seam import ImageMeta, ModelInfo, TextEncoderInfo

ASSETS = Path(__file__).resolve().parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"
MAX_TOKENS = 77  # CLIP's context: BOS + 75 tokens + EOS
FAMILIES = ("sd1", "sd2", "sdxl")
#: encoder keys per family, in file order (see ``TextEncoderInfo``)
ENCODER_KEYS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}
#: which shipped config folder describes a single-file checkpoint of each family
CONFIG_FOLDERS = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
PLACEHOLDER_ADVICE = "pick a rare made-up word such as 'sks-cat'"


# ----------------------------------------------------------------------------------------------
# conditioning


@dataclass
class DiffusersCond:
    """What ``encode_text`` returns and ``denoise`` consumes (opaque to the trainers).

    ``context``: cross-attention states ``[B, 77, D]``; ``pooled``: SDXL's pooled text embedding
    ``[B, P]`` (None otherwise); ``meta``: SDXL size conditioning per prompt (None = use the image
    size), turned into ``time_ids`` only in ``denoise`` because that is where the size is known.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    meta: tuple[ImageMeta | None, ...] | None = None

    def __len__(self) -> int:
        return self.context.shape[0]

    def time_ids(self, pixel_hw: tuple[int, int]) -> torch.Tensor:
        """SDXL's six size numbers per prompt: original (h, w), crop (top, left), target (h, w)."""
        metas = self.meta or (None,) * len(self)
        rows = []
        for m in metas:
            if m is None:
                rows.append((*pixel_hw, 0, 0, *pixel_hw))
            else:
                rows.append((*m.original_hw, *m.crop_top_left, *(m.target_hw or pixel_hw)))
        # fp32 whatever the compute dtype: bf16 cannot hold e.g. 1343 (the UNet embeds them in fp32)
        return torch.tensor(rows, dtype=torch.float32, device=self.context.device)


@dataclass
class _Tokens:
    """One encoder's token ids for a batch, and where the placeholder's vectors go."""

    ids: torch.Tensor  # [B, 77] long
    slot: torch.Tensor  # [B, 77] long: row of the placeholder's vectors, -1 elsewhere


# ----------------------------------------------------------------------------------------------
# small helpers


def pick_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA that has it, fp16 on older CUDA, fp32 elsewhere (CPU kernels are fp32-fast)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def clip_tokenizer(pad_token: str = "<|endoftext|>", vocab_dir: Path | str = CLIP_TOKENIZER_DIR):
    """CLIP's BPE tokenizer from the shipped files; ``pad_token`` is the one thing models differ in
    (OpenAI CLIP pads with ``<|endoftext|>`` (49407), OpenCLIP with ``!`` (0))."""
    from transformers import CLIPTokenizer

    vocab, merges = str(Path(vocab_dir) / "vocab.json"), str(Path(vocab_dir) / "merges.txt")
    kw = dict(pad_token=pad_token, model_max_length=MAX_TOKENS)
    try:  # transformers 5: tokenizers-backed class, takes the files as vocab=/merges=
        return CLIPTokenizer(vocab=vocab, merges=merges, **kw)
    except TypeError:  # transformers 4: slow tokenizer, vocab_file=/merges_file=
        return CLIPTokenizer(vocab_file=vocab, merges_file=merges, **kw)


@contextlib.contextmanager
def offline():
    """Forbid the Hugging Face Hub while loading: the env var for libraries that read it late, the
    hub constant for those that read it at import.  Every call also passes local paths and
    ``local_files_only=True``; this is the belt to those braces."""
    import huggingface_hub.constants as hub_constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


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


# ----------------------------------------------------------------------------------------------
# the host


class DiffusersHost:
    """``trainers.seam.Host`` over diffusers modules (SD1.x eps, SD2.x eps/v, SDXL)."""

    latent_channels: int
    latent_scale: int

    def __init__(self, unet, vae, tokenizers, text_encoders, scheduler, *, family: str,
                 prediction: str, name: str, device: torch.device, dtype: torch.dtype,
                 file: Path | None = None):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
        n_enc = len(ENCODER_KEYS[family])
        if len(tokenizers) != n_enc or len(text_encoders) != n_enc:
            raise ValueError(f"{family} needs {n_enc} tokenizer(s) and text encoder(s), "
                             f"got {len(tokenizers)} and {len(text_encoders)}")
        if family == "sdxl" and not hasattr(text_encoders[1], "text_projection"):
            raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection (pooled output)")
        self.device, self.compute_dtype = torch.device(device), dtype
        self.family, self.prediction = family, prediction
        self.unet = self._freeze(unet, dtype)
        self.vae = self._freeze(vae, self._vae_dtype(vae, dtype))
        self.text_encoder_modules = [self._freeze(te, dtype) for te in text_encoders]
        self.tokenizers = list(tokenizers)
        self.latent_channels = int(unet.config.in_channels)
        self.latent_scale = 2 ** (len(vae.config.block_out_channels) - 1)
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

    def text_encoders(self) -> Sequence[TextEncoderInfo]:
        return [TextEncoderInfo(key, int(te.config.hidden_size))
                for key, te in zip(ENCODER_KEYS[self.family], self.text_encoder_modules)]

    def training_sigmas(self) -> torch.Tensor:
        return self._sigmas.float()

    def frozen_parameters(self) -> dict[str, torch.Tensor]:
        """The live parameters (for checks: do not modify), prefixed by component."""
        parts = {"unet": self.unet, "vae": self.vae}
        parts.update({("text_encoder" if i == 0 else f"text_encoder_{i + 1}"): te
                      for i, te in enumerate(self.text_encoder_modules)})
        return {f"{p}.{n}": t for p, m in parts.items() for n, t in m.named_parameters()}

    # -- placeholder words -------------------------------------------------------------------

    def check_placeholder(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"The placeholder word is empty; {PLACEHOLDER_ADVICE}.")
        for key, tok in zip(ENCODER_KEYS[self.family], self.tokenizers):
            ids = tok(name, add_special_tokens=False).input_ids
            if len(ids) == 1:
                word = tok.convert_ids_to_tokens(ids)[0]
                raise ValueError(
                    f"The placeholder {name!r} is already the word {word!r} of the {key} text "
                    "encoder's vocabulary: training it would change what every prompt with that word "
                    f"means, and WebUIs would load the embedding in that word's place; "
                    f"{PLACEHOLDER_ADVICE}.")

    def token_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        out = {}
        for key, tok, te in zip(ENCODER_KEYS[self.family], self.tokenizers, self.text_encoder_modules):
            ids = torch.tensor(tok(text, add_special_tokens=False).input_ids, dtype=torch.long)
            table = te.get_input_embeddings().weight
            out[key] = table[ids.to(table.device)].detach().to(self.device, torch.float32).clone()
        return out

    # -- images ------------------------------------------------------------------------------

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
        cfg = self.vae.config
        with torch.no_grad():
            x = images.to(self.device, self.vae.dtype).permute(0, 3, 1, 2) * 2 - 1
            z = self.vae.encode(x).latent_dist.mean
            z = (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor
        return z.float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        with torch.no_grad():
            z = latents.to(self.device, self.vae.dtype) / cfg.scaling_factor
            z = z + (getattr(cfg, "shift_factor", None) or 0.0)
            x = self.vae.decode(z).sample
        return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    # -- text --------------------------------------------------------------------------------

    def encode_text(self, prompts: Sequence[str], placeholder: str | None = None,
                    vectors: dict[str, torch.Tensor] | None = None,
                    meta: Sequence[ImageMeta] | None = None) -> DiffusersCond:
        prompts = self._check_prompts(prompts, placeholder, vectors, meta)
        keys = ENCODER_KEYS[self.family]
        n = vectors[keys[0]].shape[0] if (placeholder and vectors) else 0  # same n for all (checked)
        outs = []
        for key, tok, te in zip(keys, self.tokenizers, self.text_encoder_modules):
            tokens = self._tokenize(tok, prompts, placeholder if n else None, n)
            outs.append(self._run_encoder(te, tokens, vectors[key] if n else None))
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

    def _tokenize(self, tok, prompts: list[str], placeholder: str | None, n: int) -> _Tokens:
        """BOS + text with ``n`` slots per placeholder occurrence + EOS, cut to 77, padded with the
        tokenizer's own pad token (SD1: EOS 49407; OpenCLIP encoders: "!" = 0)."""
        ids, slots = [], []
        for prompt in prompts:
            row, slot = [], []
            for k, piece in enumerate(prompt.split(placeholder) if placeholder else [prompt]):
                if k:  # a placeholder occurrence between pieces; the id is overwritten by the hook
                    row += [0] * n
                    slot += list(range(n))
                piece_ids = tok(piece, add_special_tokens=False).input_ids if piece else []
                row += piece_ids
                slot += [-1] * len(piece_ids)
            row, slot = row[: MAX_TOKENS - 2], slot[: MAX_TOKENS - 2]
            pad = MAX_TOKENS - 2 - len(row)
            ids.append([tok.bos_token_id, *row, tok.eos_token_id] + [tok.pad_token_id] * pad)
            slots.append([-1, *slot, -1] + [-1] * pad)
        return _Tokens(ids=torch.tensor(ids, device=self.device),
                       slot=torch.tensor(slots, device=self.device))

    def _run_encoder(self, te, tokens: _Tokens, vec: torch.Tensor | None):
        """Run one text encoder; a forward hook on its token-embedding table swaps the placeholder
        slots for ``vec`` (works on transformers 4 and 5, whatever the module nesting).  The swap is
        a ``torch.where``: no in-place write, so autograd reaches ``vec`` (cast at the splice:
        trainable vectors stay fp32, the encoder computes in its own dtype)."""
        handle = None
        if vec is not None and bool((tokens.slot >= 0).any()):
            mask = (tokens.slot >= 0).unsqueeze(-1)
            rows = tokens.slot.clamp(min=0)

            def splice(_module, _inputs, out):
                return torch.where(mask, vec.to(out.device, out.dtype)[rows], out)

            handle = te.get_input_embeddings().register_forward_hook(splice)
        try:
            return te(input_ids=tokens.ids, output_hidden_states=self.family == "sdxl")
        finally:
            if handle is not None:
                handle.remove()

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
        for i, (key, te) in enumerate(zip(ENCODER_KEYS[self.family], self.text_encoder_modules)):
            out[key] = ("text_encoder" if i == 0 else f"text_encoder_{i + 1}", te)
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
                parametrize.register_parametrization(module, pname, _Patch(fns[name]), unsafe=True)
                done.append((module, pname))
            yield
        finally:
            for module, pname in reversed(done):
                parametrize.remove_parametrizations(module, pname, leave_parametrized=False)

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

    def unet_layout(self):
        from ..trainers.formats.unet_names import UNetLayout

        return UNetLayout.from_config(self.unet.config)

    @contextlib.contextmanager
    def gradient_checkpointing(self):
        was = bool(getattr(self.unet, "gradient_checkpointing", False))
        self.unet.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if not was:
                self.unet.disable_gradient_checkpointing()

    def save_checkpoint(self, path: str | os.PathLike, deltas: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> Path:
        """The model with ``deltas`` added (names as ``tunable_parameters``), as one single-file
        checkpoint in the original layout (``hosts/ldm_export``), written atomically.  fp16 when
        the model computes in half precision, else fp32 (exact)."""
        import safetensors.torch

        from ..trainers.formats.files import atomic_write_bytes
        from .ldm_export import to_ldm_state_dict

        half = self.compute_dtype in (torch.float16, torch.bfloat16)
        params = {}
        for part in self._parts():
            params.update(self.tunable_parameters(part))
        unknown = sorted(set(deltas) - set(params))
        if unknown:
            raise ValueError(f"deltas for parameters this model does not have: {unknown[:3]}")
        replace = {n: (params[n].float() + d.to(params[n].device).float()) for n, d in deltas.items()}
        parts = dict(unet=self.unet, vae=self.vae, text_encoders=self.text_encoder_modules, family=self.family)
        sd = to_ldm_state_dict(parts, replace)
        dtype = torch.float16 if half else torch.float32
        sd = {k: (v.to(dtype) if v.is_floating_point() else v).cpu().contiguous() for k, v in sd.items()}
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        data = safetensors.torch.save(sd, metadata=meta)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return path


_TUNABLE_MODULES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


class _Patch(torch.nn.Module):
    """A parametrization that computes ``fn(original)``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.fn(original)


# ----------------------------------------------------------------------------------------------
# inference of family / prediction from modules


def infer_family(unet, text_encoders) -> str:
    """sdxl: two encoders (and a text_time UNet); sd2: OpenCLIP's gelu; sd1: OpenAI CLIP's quick_gelu."""
    text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if len(text_encoders) == 2 or text_time:
        if not (len(text_encoders) == 2 and text_time):
            raise ValueError("an SDXL model needs two text encoders and a UNet with "
                             "addition_embed_type='text_time'")
        return "sdxl"
    act = getattr(text_encoders[0].config, "hidden_act", "quick_gelu")
    return "sd2" if act == "gelu" else "sd1"


def prediction_from_scheduler(scheduler) -> str:
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise ValueError(f"unsupported prediction_type {kind!r}: only 'epsilon' and 'v_prediction'")
    return PREDICTIONS[kind]



# ----------------------------------------------------------------------------------------------
# loading, offline: diffusers folders


def load_folder(path: Path, family: str | None = None) -> dict:
    """Modules of a diffusers folder (``model_index.json``), from local files only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path} is a folder but not a diffusers model (no model_index.json); "
                         "give a diffusers folder or a .safetensors/.ckpt checkpoint file")
    index = json.loads((path / "model_index.json").read_text())
    two = (index.get("text_encoder_2") or [None])[0] is not None
    parts = [("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)]
    if two:
        parts.append(("text_encoder_2", CLIPTextModelWithProjection))
    # diffusers warns at length when asked for low-memory loading without accelerate: ask only with it
    low_mem = {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    loaded = {}
    for sub, cls in parts:
        try:
            kw = low_mem if sub in ("unet", "vae") else {}
            loaded[sub] = cls.from_pretrained(str(path / sub), local_files_only=True, **kw)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path.name}: cannot load its {sub} ({e})") from e
    tes = [loaded["text_encoder"]] + ([loaded["text_encoder_2"]] if two else [])
    toks = [folder_tokenizer(path / "tokenizer")] + ([folder_tokenizer(path / "tokenizer_2")] if two else [])
    scheduler = folder_scheduler(path / "scheduler")
    return dict(unet=loaded["unet"], vae=loaded["vae"], tokenizers=toks, text_encoders=tes,
                scheduler=scheduler, family=family or infer_family(loaded["unet"], tes),
                prediction=prediction_from_scheduler(scheduler))


def folder_tokenizer(folder: Path):
    """The folder's own tokenizer files if it has them, else the shipped BPE with the pad token its
    ``tokenizer_config.json`` names (the shipped config folders carry only that file)."""
    from transformers import CLIPTokenizer

    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        tok.model_max_length = MAX_TOKENS
        return tok
    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"{folder} has no tokenizer files")
    pad = json.loads((folder / "tokenizer_config.json").read_text()).get("pad_token", "<|endoftext|>")
    return clip_tokenizer(pad["content"] if isinstance(pad, dict) else pad)


def folder_scheduler(folder: Path):
    """Any SD scheduler config as a DDPMScheduler: the host needs only its training schedule
    (betas -> alphas_cumprod) and prediction_type, which every discrete SD scheduler shares."""
    from diffusers import DDPMScheduler

    try:
        config = DDPMScheduler.load_config(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the scheduler config in {folder} ({e})") from e
    return DDPMScheduler.from_config(config)


# ----------------------------------------------------------------------------------------------
# loading, offline: single-file (LDM / SGM layout) checkpoints


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .ckpt file; pickles are loaded with ``weights_only=True``, so a
    file that needs arbitrary code to unpickle is refused, never executed."""
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path.name} is not a readable .safetensors file ({e})") from e
    elif suffix in (".ckpt", ".pt", ".pth"):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path.name} holds Python objects beyond tensors; it is not loaded, because "
                             "unpickling them could run arbitrary code. Convert it to .safetensors "
                             "with a tool you trust, or use the .safetensors release") from e
        except Exception as e:
            raise ValueError(f"{path.name} is not a readable PyTorch checkpoint ({e})") from e
    else:
        raise ValueError(f"unsupported file type {suffix!r} ({path.name}): give a .safetensors or .ckpt "
                         "checkpoint, or a diffusers folder (with model_index.json)")
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(sd, dict):
        raise ValueError(f"{path.name} does not contain a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def detect_family(sd: dict[str, torch.Tensor]) -> str:
    """"sd1", "sd2" or "sdxl" from the key layout of a single-file checkpoint; ValueError otherwise."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in sd)

    if not has("model.diffusion_model."):
        raise ValueError("no UNet weights (model.diffusion_model.*): not a full Stable Diffusion "
                         f"checkpoint{_what_it_looks_like(sd)}")
    if has("model.diffusion_model.joint_blocks") or has("model.diffusion_model.double_blocks"):
        raise ValueError("this is an SD3 / Flux checkpoint; only SD1.x, SD2.x and SDXL are supported")
    if has("conditioner.embedders.1."):
        family = "sdxl"
    elif has("conditioner.embedders.0.model."):
        raise ValueError("this is the SDXL refiner, which cannot learn new words; load the SDXL base")
    elif has("cond_stage_model.model."):
        family = "sd2"
    elif has("cond_stage_model.transformer"):
        family = "sd1"
    else:
        raise ValueError("no text encoder weights (cond_stage_model.* / conditioner.embedders.*) in "
                         "the checkpoint; a UNet-only file cannot be used")
    conv_in = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise ValueError(f"this UNet takes {conv_in.shape[1]} input channels (an inpainting or "
                         "instruct-pix2pix model); only plain 4-channel text-to-image models are supported")
    return family


def _what_it_looks_like(sd: dict) -> str:
    keys = list(sd)
    if any("lora" in k for k in keys):
        return " (it looks like a LoRA)"
    if any(k in sd for k in ("emb_params", "string_to_param", "clip_l", "clip_g")):
        return " (it looks like a textual-inversion embedding)"
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys):
        return " (it looks like a VAE)"
    return ""


def load_single_file(path: Path, family: str | None = None, prediction: str = "auto",
                     config_dir: str | os.PathLike | None = None) -> dict:
    """Modules of a single-file checkpoint.  The key conversion is diffusers' own
    (``diffusers.loaders.single_file_utils``, the functions ``from_single_file`` uses); the modules
    are built on the meta device from the shipped configs and the converted tensors are *assigned*,
    so nothing is randomly initialised first, and any weight the file lacks is an error instead of
    the silent random init ``from_single_file`` gives without ``accelerate``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    sd = read_checkpoint(path)
    family = family or detect_family(sd)
    if not any(k.startswith(("first_stage_model.", "vae.")) for k in sd):
        raise ValueError(f"{path.name} has no VAE weights (first_stage_model.*); use a checkpoint "
                         "with its VAE baked in, or a diffusers folder")
    folder = Path(config_dir) if config_dir else ASSETS / CONFIG_FOLDERS[family]
    unet = _assign_converted(UNet2DConditionModel, folder / "unet", sd, convert_ldm_unet_checkpoint, path)
    vae = _assign_converted(AutoencoderKL, folder / "vae", sd, convert_ldm_vae_checkpoint, path)
    tes = _text_encoders_from_ldm(sd, folder, family, path)
    toks = [folder_tokenizer(folder / "tokenizer")]
    if family == "sdxl":
        toks.append(folder_tokenizer(folder / "tokenizer_2"))
    scheduler = folder_scheduler(folder / "scheduler")
    pred = _auto_prediction(sd, family, scheduler) if prediction == "auto" else prediction
    return dict(unet=unet, vae=vae, tokenizers=toks, text_encoders=tes, scheduler=scheduler,
                family=family, prediction=pred)


def _auto_prediction(sd: dict, family: str, scheduler) -> str:
    """SD1 and SDXL base: what the config folder's scheduler says (eps for the shipped ones).  SD2
    ships as 768-v and 512-base (eps) with the same keys; like ComfyUI
    (``supported_models.SD20.model_type``) we call it v unless the last up-block's first norm bias
    is as flat as an eps model's.  Pass ``prediction=`` to override."""
    if family != "sd2":
        return prediction_from_scheduler(scheduler)
    bias = sd.get("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias")
    if bias is not None and torch.std(bias.float(), unbiased=False) <= 0.09:
        return "eps"
    return "v"


def _assign_converted(cls, config_folder: Path, sd: dict, convert, path: Path):
    """Build a diffusers model on the meta device and assign the converted checkpoint tensors."""
    config = cls.load_config(str(config_folder), local_files_only=True)
    with torch.device("meta"):
        model = cls.from_config(config)
    weights = {k: v.contiguous() for k, v in convert(checkpoint=sd, config=config).items() if v is not None}
    return _assign(model, weights, f"{config_folder.name}", path)


def _text_encoders_from_ldm(sd: dict, folder: Path, family: str, path: Path) -> list:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def openclip(prefix):
        return lambda model: convert_open_clip_checkpoint(model, sd, prefix=prefix)

    specs = {  # (subfolder, class, converter) per encoder, in file order
        "sd1": [("text_encoder", CLIPTextModel, lambda m: convert_ldm_clip_checkpoint(sd))],
        "sd2": [("text_encoder", CLIPTextModel, openclip("cond_stage_model.model."))],
        "sdxl": [("text_encoder", CLIPTextModel, lambda m: convert_ldm_clip_checkpoint(sd)),
                 ("text_encoder_2", CLIPTextModelWithProjection, openclip("conditioner.embedders.1.model."))],
    }[family]
    out = []
    for sub, cls, convert in specs:
        config = CLIPTextConfig.from_pretrained(str(folder / sub), local_files_only=True)
        with torch.device("meta"):
            model = cls(config)
        weights = _fit_text_model_prefix(convert(model), model)
        out.append(_assign(model, weights, sub, path))
    return out


def _fit_text_model_prefix(weights: dict, model) -> dict:
    """transformers 5 flattened ``CLIPTextModel`` (no ``text_model.`` prefix), 4.x and the
    projection model keep it, old checkpoints may lack it: match each key to the model's naming."""
    expected = set(model.state_dict())
    out = {}
    for k, v in weights.items():
        for cand in (k, k.removeprefix("text_model."), "text_model." + k):
            if cand in expected:
                out[cand] = v.contiguous()
                break
    return out


def _assign(model, weights: dict, what: str, path: Path):
    try:
        missing, _unexpected = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches: the file is another architecture
        raise ValueError(f"{path.name}: its {what} weights do not fit the expected architecture; "
                         f"is the model family right? ({str(e)[:300]})") from e
    if missing:
        raise ValueError(f"{path.name}: {len(missing)} {what} weights are missing from the file "
                         f"(e.g. {missing[:3]}); it is not a complete checkpoint of this family")
    _rebuild_meta_buffers(model, what, path)
    return model.eval()


def _rebuild_meta_buffers(model, what: str, path: Path) -> None:
    """Non-persistent buffers are not in any file and stay on meta; CLIP's position_ids is the only
    one these models have, and it is just arange."""
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise ValueError(f"{path.name}: {what} buffer {name} could not be initialised")
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module.register_buffer(attr, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)
