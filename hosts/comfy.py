"""The ComfyUI host: the seam (``trainers/seam.py``) on the MODEL, CLIP and VAE objects that
ComfyUI's CheckpointLoaderSimple returns, for SD1.x (eps), SD2.x (eps or v) and SDXL.

Importable only inside ComfyUI (or a process that put a ComfyUI checkout on ``sys.path``).

How a node uses it::

    host = ComfyHost(model, clip, vae)            # cheap: clones, never mutates its inputs
    with host.training():                          # inference_mode(False) + enable_grad()
        result = train_textual_inversion(host, images, cfg, progress)

Why it looks the way it does (evidence: ``shared/reference/comfyui-internals.md``):

* ComfyUI runs every node under ``torch.inference_mode()``; the loaded weights are inference
  tensors, which autograd refuses to save for backward.  The host trains through *clones* of the
  MODEL and CLIP patchers carrying identity weight *and* bias wrappers, so ComfyUI's ops hand out a
  per-forward copy of every weight (``comfy/ops.py`` ``cast_bias_weight``).  The input objects, and
  the BaseModel / text-encoder modules they share with the clones, are never modified.
* ComfyUI's ``CLIPLayer.forward`` adds its residuals in place, which breaks backward through the
  text encoder; while a text encoder runs, ``encode_text`` swaps in an out-of-place forward and
  restores the original in ``finally``.
* The placeholder's vectors enter the text encoder the way an ``embedding:NAME`` file does: the
  prompt is tokenised by the CLIP's own tokenizer with the placeholder resolved to the vectors
  instead of a file, so chunking, padding, the end token and prompt weights are exactly what the
  user's ``CLIPTextEncode`` of ``... embedding:NAME ...`` will produce after training, and the
  sequences stay 77 tokens long with the right pad token per encoder.
* ``denoise`` is ``BaseModel.apply_model`` (returns x0) with its keyword conditioning built by
  ``BaseModel.extra_conds`` as ComfyUI's samplers build it, so SDXL's ``y`` (pooled text + size
  embeddings) is never hard-coded here.
* Every method leaves inference mode for its own work, so the tensors it returns are ordinary
  tensors even when called outside ``training()`` (VAE and sampling previews); the trainer's
  own tensors and its backward pass still need ``training()``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import uuid
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

import comfy.clip_model
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sd1_clip
import comfy.supported_models

from ..trainers.seam import ImageMeta, ModelInfo, TextEncoderInfo

#: text-encoder keys per family, in file order; the key is also the attribute name of the encoder
#: in ComfyUI's tokenizer and text-encoder objects, and ``key[5:]`` its key in token dicts
ENCODERS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}

#: stands in for the placeholder while ComfyUI's tokenizer runs (resolved to the vectors)
_MARKER = "likeness_placeholder_7f3a9c"

SUPPORTED = "Likeness supports SD1.x, SD2.x and SDXL"

#: layer types whose weights a fine-tune may patch (comfy ops subclass these)
_TUNABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


@dataclass
class ComfyCond:
    """What ``encode_text`` returns and ``denoise`` consumes: one entry per prompt, on ``device``.

    ``cross_attn[i]`` is ``[1, 77*k, width]`` (k = 77-token chunks of prompt i), ``pooled[i]`` the
    text encoder's pooled output ``[1, P]`` (SDXL: clip_g's projection, feeds ``y``), ``size[i]``
    SDXL's size conditioning (empty: the latent's own size, as ComfyUI's samplers default it)."""

    cross_attn: list[torch.Tensor]
    pooled: list[torch.Tensor | None]
    size: list[dict[str, int]]
    extra: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.cross_attn)


class _Wrapper:
    """Weight/bias wrapper that always returns a tensor of its own, patched when a trainer asks.

    Installing any wrapper makes comfy ops copy the weight per forward (cast_bias_weight,
    copy=True), so autograd never saves the load-time inference tensors.  Under DynamicVRAM the
    cast weight can instead be a cached resident tensor made in inference mode, or a view into a
    cast buffer that the next layer overwrites; cloning (outside inference mode) gives autograd a
    stable, ordinary tensor.  ``patches`` is the host's live dict (``parameter_patches``): a
    LoRA or a full fine-tune's delta enters here, on our clone only, never in the stored weight."""

    def __init__(self, key: str, patches: dict):
        self.key, self.patches = key, patches

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        fn = self.patches.get(self.key)
        return fn(t) if fn is not None else t


def _add_identity_wrappers(patcher, patches: dict) -> None:
    for name, m in patcher.model.named_modules():
        if hasattr(m, "weight_function"):
            if getattr(m, "weight", None) is not None:
                patcher.add_weight_wrapper(f"{name}.weight", _Wrapper(f"{name}.weight", patches))
            if getattr(m, "bias", None) is not None:
                patcher.add_weight_wrapper(f"{name}.bias", _Wrapper(f"{name}.bias", patches))


def _clip_layer_body(self, x, mask=None, optimized_attention=None):
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


#: set while a host trains with gradient checkpointing: text-encoder layers are recomputed in
#: backward too (each forward otherwise keeps a copy of every patched weight it used)
_CHECKPOINT_TEXT = {"on": False}


def _clip_layer_forward_out_of_place(self, x, mask=None, optimized_attention=None):
    if _CHECKPOINT_TEXT["on"] and torch.is_grad_enabled():
        import torch.utils.checkpoint as ckpt

        return ckpt.checkpoint(_clip_layer_body, self, x, mask, optimized_attention, use_reentrant=False)
    return _clip_layer_body(self, x, mask, optimized_attention)


@contextlib.contextmanager
def out_of_place_clip_layers() -> Iterator[None]:
    """Swap ``comfy.clip_model.CLIPLayer.forward`` for one without in-place residual adds while the
    block runs; the original is restored in ``finally``.  Re-entrant."""
    cls = comfy.clip_model.CLIPLayer
    original = cls.__dict__["forward"]
    if original is _clip_layer_forward_out_of_place:
        yield
        return
    cls.forward = _clip_layer_forward_out_of_place
    try:
        yield
    finally:
        cls.forward = original


def _family(model) -> str:
    base = getattr(model, "model", None)
    cfg = getattr(base, "model_config", None)
    what = type(base).__name__ + (f" ({type(cfg).__name__})" if cfg is not None else "")
    if type(base) is comfy.model_base.SDXL and isinstance(cfg, comfy.supported_models.SDXL):
        family = "sdxl"
    elif type(base) is comfy.model_base.BaseModel and isinstance(cfg, comfy.supported_models.SD20):
        family = "sd2"
    elif type(base) is comfy.model_base.BaseModel and isinstance(cfg, comfy.supported_models.SD15):
        family = "sd1"
    else:
        raise ValueError(f"{SUPPORTED}; this MODEL is {what}.")
    latent_format = {"sd1": comfy.latent_formats.SD15, "sd2": comfy.latent_formats.SD15,
                     "sdxl": comfy.latent_formats.SDXL}[family]
    if type(base.latent_format) is not latent_format:
        raise ValueError(f"{SUPPORTED}; this MODEL ({what}) uses the latent format "
                         f"{type(base.latent_format).__name__}, which Likeness does not know.")
    return family


def _prediction(model_sampling, what: str) -> str:
    if not isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise ValueError(f"{SUPPORTED} with a discrete noise schedule; this MODEL ({what}) samples "
                         f"with {type(model_sampling).__mro__[1].__name__}. Remove the model-sampling "
                         "patch (e.g. ModelSamplingContinuousEDM) before training.")
    den = type(model_sampling).calculate_denoised
    if den is comfy.model_sampling.EPS.calculate_denoised:
        return "eps"
    if den is comfy.model_sampling.V_PREDICTION.calculate_denoised:
        return "v"
    raise ValueError(f"{SUPPORTED} with eps or v prediction; this MODEL ({what}) predicts with "
                     f"{type(model_sampling).__name__}. Use 'eps' or 'v_prediction' in "
                     "ModelSamplingDiscrete, or none.")


def _checkpoint_name(model) -> str:
    init = getattr(model, "cached_patcher_init", None)
    try:
        path = init[1][0]
        if isinstance(path, str) and path:
            return os.path.basename(path)
    except (TypeError, IndexError):
        pass
    return "unknown"


class ComfyHost:
    """``trainers.seam.Host`` on ComfyUI's MODEL (ModelPatcher), CLIP and VAE.

    ``model`` and ``clip`` must come from the same SD1.x, SD2.x or SDXL checkpoint (patches,
    LoRAs, clip skip and model-sampling patches upstream are honoured).  ``vae`` is needed only by
    ``encode_images`` / ``decode_latents``.  ``name`` overrides the checkpoint name recorded in
    ``info`` (default: the file CheckpointLoaderSimple loaded, when known).
    """

    def __init__(self, model, clip, vae=None, *, name: str | None = None):
        if model is None or clip is None:
            raise ValueError("Likeness needs both the MODEL and the CLIP of a checkpoint.")
        family = _family(model)
        what = type(model.model).__name__
        self._ms = model.get_model_object("model_sampling")
        prediction = _prediction(self._ms, what)
        self._check_clip(clip, family)
        if vae is not None:
            self._check_vae(vae, model)

        self.info = ModelInfo(family=family, prediction=prediction, name=name or _checkpoint_name(model),
                              hash=None, extra={"model_class": what, "clip_layer": clip.layer_idx})
        self.device = torch.device(model.load_device)
        manual = model.get_model_object("manual_cast_dtype")
        self.compute_dtype = manual if manual is not None else model.model_dtype()
        self.latent_channels = int(model.model.latent_format.latent_channels)
        self.latent_scale = int(model.model.latent_format.spacial_downscale_ratio)

        # Trainable clones: same weights, identity wrappers -> per-forward copies (see module doc).
        self._input_model, self._input_clip = model, clip
        self._patches: dict = {}
        self._model = model.clone()
        _add_identity_wrappers(self._model, self._patches)
        self._clip = clip.clone()
        _add_identity_wrappers(self._clip.patcher, self._patches)
        self._vae = vae
        self._encoders = tuple(
            TextEncoderInfo(key, int(getattr(clip.tokenizer, key).embedding_size)) for key in ENCODERS[family]
        )

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_clip(clip, family: str) -> None:
        tok, cse = getattr(clip, "tokenizer", None), getattr(clip, "cond_stage_model", None)
        for key in ENCODERS[family]:
            sub, enc = getattr(tok, key, None), getattr(cse, key, None)
            if not isinstance(sub, comfy.sd1_clip.SDTokenizer) or not isinstance(enc, comfy.sd1_clip.SDClipModel):
                have = type(cse).__name__ if cse is not None else type(clip).__name__
                raise ValueError(f"This CLIP ({have}) does not belong to the {family.upper()} MODEL: it has no "
                                 f"{key} text encoder. Connect the CLIP output of the same checkpoint loader.")
            width = enc.transformer.get_input_embeddings().weight.shape[-1]
            if width != sub.embedding_size:
                raise ValueError(f"The {key} text encoder is {width} wide but its tokenizer expects "
                                 f"{sub.embedding_size}; this CLIP is not a standard {family.upper()} CLIP.")

    @staticmethod
    def _check_vae(vae, model) -> None:
        lc = getattr(vae, "latent_channels", None)
        fmt = model.model.latent_format
        ratio = getattr(vae, "downscale_ratio", None)
        if lc != fmt.latent_channels or ratio != fmt.spacial_downscale_ratio:
            raise ValueError(f"This VAE makes {lc}-channel latents at 1/{ratio} scale, but the MODEL expects "
                             f"{fmt.latent_channels} channels at 1/{fmt.spacial_downscale_ratio}. Connect the VAE "
                             "of the same checkpoint (or an SD/SDXL VAE).")

    # ------------------------------------------------------------------ usage contract
    @contextlib.contextmanager
    def training(self) -> Iterator["ComfyHost"]:
        """Leave ComfyUI's ``torch.inference_mode()`` and enable grad for the block.

        Everything a trainer creates that autograd may save (vectors, noise, optimizer state) must
        be created inside; the host's own weights are handled by its clones."""
        with torch.inference_mode(False), torch.enable_grad():
            yield self

    @staticmethod
    def _normal_mode():
        # Not inference mode for the host's own work: returned tensors must be usable by autograd.
        return torch.inference_mode(False)

    def _load(self, models, memory_required: float = 0) -> None:
        comfy.model_management.load_models_gpu(models, memory_required=memory_required)

    # ------------------------------------------------------------------ the seam
    def text_encoders(self) -> Sequence[TextEncoderInfo]:
        return self._encoders

    def _sub_tokenizer(self, key: str):
        return getattr(self._clip.tokenizer, key)

    def _token_ids(self, key: str, text: str) -> list[int]:
        sub = self._sub_tokenizer(key)
        ids = sub.tokenizer(text)["input_ids"]
        end = -1 if sub.tokenizer_adds_end_token else None
        return list(ids[sub.tokens_start:end])

    def check_placeholder(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError("The placeholder word is empty: pick a made-up word such as 'my_cat_lk'.")
        if any(ch.isspace() for ch in name):
            raise ValueError(f"The placeholder {name!r} contains whitespace; ComfyUI's 'embedding:NAME' ends "
                             "at the first space. Use one word, e.g. with '_' instead of spaces.")
        for enc in self._encoders:
            ids = self._token_ids(enc.key, name)
            if len(ids) == 1:
                word = self._sub_tokenizer(enc.key).inv_vocab.get(ids[0], name)
                raise ValueError(
                    f"{name!r} is already a word of the text encoder's vocabulary ({enc.key} token {ids[0]} "
                    f"{word!r}); an embedding named so would replace that word in every prompt in A1111/Forge "
                    f"and confuse its meaning. Pick a made-up word such as '{name}_lk' or 'lk_{name}'.")

    def token_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        out = {}
        with self._normal_mode(), torch.no_grad():
            self._load([self._clip.patcher])
            dev = self._clip.patcher.load_device
            for enc in self._encoders:
                ids = self._token_ids(enc.key, text)
                table = getattr(self._clip.cond_stage_model, enc.key).transformer.get_input_embeddings()
                if ids:
                    e = table(torch.tensor([ids], device=dev, dtype=torch.long), out_dtype=torch.float32)[0]
                else:
                    e = torch.zeros(0, enc.width)
                out[enc.key] = e.to(self.device, torch.float32).clone()
        return out

    def training_sigmas(self) -> torch.Tensor:
        with self._normal_mode():
            s = self._ms.sigmas.detach().to(self.device, torch.float32).clone()
        if s.numel() > 1 and s[0] > s[-1]:
            s = s.flip(0)
        return s

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vae = self._need_vae()
        if images.ndim != 4 or images.shape[-1] < 3:
            raise ValueError(f"images must be [B, H, W, 3] (ComfyUI IMAGE), got {tuple(images.shape)}")
        h, w = images.shape[1:3]
        f = self.latent_scale
        if h % f or w % f:
            raise ValueError(f"image size {w}x{h} is not a multiple of {f}; crop or resize first")
        with torch.inference_mode():
            raw = vae.encode(images[..., :3])
        with self._normal_mode(), torch.no_grad():
            lat = raw.clone().to(self.device, torch.float32)
            return self._model.model.process_latent_in(lat).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._need_vae()
        with torch.inference_mode():
            raw = self._model.model.process_latent_out(latents.detach().float())
            img = vae.decode(raw)
        with self._normal_mode():
            return img[..., :3].clone().float().cpu().clamp(0, 1)

    def _need_vae(self):
        if self._vae is None:
            raise ValueError("This step needs the VAE of the checkpoint; connect it.")
        return self._vae

    # ------------------------------------------------------------------ text
    def _check_vectors(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for enc in self._encoders:
            v = vectors.get(enc.key)
            if v is None:
                raise ValueError(f"vectors for the {enc.key} text encoder are missing (have {sorted(vectors)})")
            if v.ndim == 1:
                v = v[None]
            if v.ndim != 2 or v.shape[-1] != enc.width or v.shape[0] < 1:
                raise ValueError(f"vectors[{enc.key!r}] must be [n, {enc.width}], got {tuple(v.shape)}")
            out[enc.key] = v
        return out

    def _tokenizer_with(self, vectors: dict[str, torch.Tensor]):
        """A shallow copy of the CLIP's tokenizer whose per-encoder tokenizers resolve
        ``embedding:<marker>`` to ``vectors[key]`` (everything else as before)."""
        top = copy.copy(self._clip.tokenizer)
        for key in (e.key for e in self._encoders):
            sub = copy.copy(getattr(top, key))
            original = sub._try_get_embedding
            vec = vectors[key]

            def try_get_embedding(embedding_name, _orig=original, _vec=vec):
                parts = embedding_name.split()
                if parts and parts[0] == _MARKER:
                    return _vec, " ".join(parts[1:])
                return _orig(embedding_name)

            sub._try_get_embedding = try_get_embedding
            if sub.embedding_directory is None:
                sub.embedding_directory = []
            setattr(top, key, sub)
        return top

    def encode_text(self, prompts: Sequence[str], placeholder: str | None = None,
                    vectors: dict[str, torch.Tensor] | None = None,
                    meta: Sequence[ImageMeta] | None = None) -> ComfyCond:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_text needs at least one prompt")
        if meta is not None and len(meta) != len(prompts):
            raise ValueError(f"{len(meta)} size entries for {len(prompts)} prompts")
        splice = bool(placeholder) and vectors is not None
        if splice:
            vectors = self._check_vectors(vectors)
            if torch.is_inference_mode_enabled() and any(v.requires_grad for v in vectors.values()):
                raise RuntimeError("encode_text with trainable vectors must run inside `with host.training():` "
                                   "(ComfyUI runs nodes under torch.inference_mode()).")
        conds, pooled, extra = [], [], []
        with self._normal_mode(), torch.autocast(self.device.type, enabled=False), out_of_place_clip_layers():
            self._load([self._clip.patcher])
            tokenizer = self._tokenizer_with(vectors) if splice else self._clip.tokenizer
            saved = self._clip.tokenizer
            try:
                self._clip.tokenizer = tokenizer  # our own clone's attribute; the input CLIP is untouched
                done: dict[str, int] = {}  # a batch repeats prompts (DreamBooth: B x instance, B x class)
                for p in prompts:
                    if p in done:
                        j = done[p]
                        conds.append(conds[j]), pooled.append(pooled[j]), extra.append(dict(extra[j]))
                        continue
                    done[p] = len(conds)
                    text = p.replace(placeholder, f" embedding:{_MARKER} ") if splice else p
                    tokens = self._clip.tokenize(text)
                    out = self._clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
                    c = out.pop("cond")
                    pl = out.pop("pooled_output", None)
                    conds.append(c.to(self.device))
                    pooled.append(pl.to(self.device) if torch.is_tensor(pl) else pl)
                    extra.append(out)
            finally:
                self._clip.tokenizer = saved
        size = []
        for i in range(len(prompts)):
            m = meta[i] if meta is not None else None
            if m is None:
                size.append({})
                continue
            (oh, ow), (ct, cl) = m.original_hw, m.crop_top_left
            d = {"width": int(ow), "height": int(oh), "crop_w": int(cl), "crop_h": int(ct)}
            if m.target_hw is not None:
                d["target_height"], d["target_width"] = int(m.target_hw[0]), int(m.target_hw[1])
            size.append(d)
        return ComfyCond(conds, pooled, size, extra)

    # ------------------------------------------------------------------ denoiser
    def model_kwargs(self, cond: ComfyCond, x: torch.Tensor) -> dict[str, Any]:
        """The keyword conditioning ``apply_model`` gets for ``x``: built per prompt by
        ``BaseModel.extra_conds`` the way ComfyUI's samplers build it (``c_crossattn``; SDXL ``y``),
        then batched with ComfyUI's own cond concatenation."""
        b = x.shape[0]
        if len(cond) not in (1, b):
            raise ValueError(f"conditioning for {len(cond)} prompts cannot drive a batch of {b}")
        idx = list(range(b)) if len(cond) == b else [0] * b
        f = self.latent_scale
        base = self._model.model
        per = []
        for j, i in enumerate(idx):
            params = {"width": x.shape[-1] * f, "height": x.shape[-2] * f}
            params.update(cond.size[i])
            params.update(cond.extra[i] if i < len(cond.extra) else {})
            params.update(cross_attn=cond.cross_attn[i], device=x.device, noise=x[j:j + 1],
                          prompt_type="positive")
            if cond.pooled[i] is not None:
                params["pooled_output"] = cond.pooled[i]
            per.append(base.extra_conds(**params))
        kwargs = {}
        for k in per[0]:
            items = [p[k].process_cond(batch_size=1, area=None) for p in per]
            kwargs[k] = items[0].concat(items[1:]) if len(items) > 1 else items[0].cond
        return kwargs

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: ComfyCond) -> torch.Tensor:
        with self._normal_mode():
            sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
            if sigma.ndim == 0:
                sigma = sigma.expand(x.shape[0])
            sigma = sigma.reshape(-1)
            need = self._model.model.memory_required([2 * x.shape[0]] + list(x.shape[1:]))
            self._load([self._model], memory_required=need)
            kwargs = self.model_kwargs(cond, x)
            topts = dict(self._model.model_options.get("transformer_options", {}))
            topts.update(cond_or_uncond=[0], uuids=[uuid.uuid4()], sigmas=sigma)
            return self._model.model.apply_model(x, sigma, transformer_options=topts, **kwargs)

    def output_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        with self._normal_mode():
            s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
            ones = torch.ones(s.shape[0], 1, device=s.device)
            return self._ms.calculate_denoised(s, ones, torch.zeros_like(ones)).reshape(-1).to(s.device)

    # ------------------------------------------------------------------ weights (seam.Tunable)
    def _part_root(self, part: str):
        if part == "unet":
            return self._model.model, "diffusion_model."
        if part in (e.key for e in self._encoders):
            return self._clip.cond_stage_model, f"{part}.transformer."
        have = ", ".join(["unet"] + [e.key for e in self._encoders])
        raise ValueError(f"no part {part!r} in this {self.info.family} model; have {have}")

    def tunable_parameters(self, part: str) -> dict[str, torch.Tensor]:
        root, prefix = self._part_root(part)
        out = {}
        for name, m in root.named_modules():
            if name.startswith(prefix) and hasattr(m, "weight_function") and isinstance(m, _TUNABLE):
                for pname in ("weight", "bias"):
                    t = getattr(m, pname, None)
                    if isinstance(t, torch.Tensor):
                        out[f"{name}.{pname}"] = t.detach()
        return out

    @contextlib.contextmanager
    def parameter_patches(self, fns: dict):
        """The patches ride on the wrappers our clones already carry (``_Wrapper``): nothing is
        added to the input MODEL/CLIP, and leaving the block removes every patch."""
        known = set(self._model.weight_wrapper_patches) | set(self._clip.patcher.weight_wrapper_patches)
        unknown = sorted(set(fns) - known)
        if unknown:
            raise ValueError(f"cannot patch {unknown[:3]}: not a weight or bias of this model's layers")
        self._patches.update(fns)
        try:
            yield
        finally:
            for k in fns:
                self._patches.pop(k, None)

    def unet_layout(self):
        from ..trainers.formats.unet_names import UNetLayout

        cfg = self._model.model.model_config.unet_config
        nrb = cfg["num_res_blocks"]
        levels = len(cfg["channel_mult"])
        nrb = [nrb] * levels if isinstance(nrb, int) else list(nrb)
        # ComfyUI's UNetModel takes input depths from the front of the list and output depths from
        # the back (``transformer_depth_output.pop()``): output block 0 is the list's last entry
        down_depth, up_depth = list(cfg["transformer_depth"]), list(reversed(cfg["transformer_depth_output"]))
        down, i = [], 0
        for n in nrb:
            down.append(any(d > 0 for d in down_depth[i:i + n]))
            i += n
        up, i = [], 0
        for n in reversed(nrb):  # output blocks run from the deepest level up; n + 1 per level
            up.append(any(d > 0 for d in up_depth[i:i + n + 1]))
            i += n + 1
        return UNetLayout(tuple(nrb), tuple(up), tuple(down))

    @contextlib.contextmanager
    def gradient_checkpointing(self):
        """Recompute each UNet block in backward: the blocks of the shared diffusion model get a
        checkpointing ``forward`` for the duration of the block (restored in ``finally``)."""
        import torch.utils.checkpoint as ckpt

        unet = self._model.model.diffusion_model
        blocks = list(getattr(unet, "input_blocks", [])) + [getattr(unet, "middle_block", None)] \
            + list(getattr(unet, "output_blocks", []))
        blocks = [b for b in blocks if b is not None]
        for b in blocks:
            original = b.forward

            def fwd(*args, _f=original, **kwargs):
                if not torch.is_grad_enabled():
                    return _f(*args, **kwargs)
                return ckpt.checkpoint(_f, *args, use_reentrant=False, **kwargs)

            b.forward = fwd
        _CHECKPOINT_TEXT["on"] = True
        try:
            yield
        finally:
            _CHECKPOINT_TEXT["on"] = False
            for b in blocks:
                b.__dict__.pop("forward", None)

    def lora_model(self, lora_state_dict: dict[str, torch.Tensor], strength_model: float = 1.0,
                   strength_clip: float = 1.0):
        """(MODEL, CLIP) clones of the *input* objects with a kohya LoRA applied exactly as
        ``LoraLoader`` applies a file (``comfy.sd.load_lora_for_models``)."""
        import comfy.sd

        return comfy.sd.load_lora_for_models(self._input_model, self._input_clip, lora_state_dict,
                                             strength_model, strength_clip)

    def diff_model(self, deltas: dict[str, torch.Tensor]):
        """(MODEL, CLIP) clones of the input objects with a full fine-tune's deltas as ComfyUI
        ``diff`` patches (the weights themselves are never touched)."""
        model, clip = self._input_model.clone(), self._input_clip.clone()
        unet = {k: (d,) for k, d in deltas.items() if k.startswith("diffusion_model.")}
        text = {k: (d,) for k, d in deltas.items() if not k.startswith("diffusion_model.")}
        missing = len(unet) - len(model.add_patches(unet, 1.0)) if unet else 0
        if text:
            missing += len(text) - len(clip.add_patches(text, 1.0))
        if missing:
            raise ValueError(f"{missing} trained parameters have no place in this model; nothing applied")
        return model, clip

    def save_checkpoint(self, path, deltas: dict[str, torch.Tensor], metadata: dict | None = None):
        """The model with ``deltas`` as one checkpoint file, written by ComfyUI's own
        ``save_checkpoint`` (what its CheckpointSave node writes) to a temp name, then renamed."""
        import comfy.sd

        from ..trainers.formats.files import atomic_path

        model, clip = self.diff_model({k: d.to(self.device) for k, d in deltas.items()})
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._normal_mode(), atomic_path(path) as tmp:
                comfy.sd.save_checkpoint(str(tmp), model, clip, self._vae, metadata=meta)
        finally:
            # Saving loaded the patched clones, which write their patches into the shared weights
            # (backed up).  Loading our own clones again restores the originals.
            self._load([self._model, self._clip.patcher])
        return path

    # ------------------------------------------------------------------ tests
    def frozen_parameters(self) -> dict[str, torch.Tensor]:
        out = {f"unet.{k}": v.detach() for k, v in self._model.model.diffusion_model.named_parameters()}
        out.update({f"text.{k}": v.detach() for k, v in self._clip.cond_stage_model.named_parameters()})
        if self._vae is not None:
            out.update({f"vae.{k}": v.detach() for k, v in self._vae.first_stage_model.named_parameters()})
        return out

    @property
    def model_sampling(self):
        """ComfyUI's model_sampling object the host trains against (patches honoured)."""
        return self._ms


__all__ = ["ComfyHost", "ComfyCond", "ENCODERS", "out_of_place_clip_layers"]
