"""The ComfyUI host: the seam (``trainers/seam.py``: ``Host``, ``Tunable``, ``Exportable``) on the
MODEL, CLIP and VAE objects that ComfyUI's CheckpointLoaderSimple returns, for SD1.x (eps), SD2.x
(eps or v) and SDXL.

How a node uses it::

    host = ComfyHost(model, clip, vae)            # cheap: clones, never mutates its inputs
    with host.training():                          # inference_mode(False) + enable_grad()
        result = train_textual_inversion(host, images, cfg, progress)

Why it looks the way it does:

* ComfyUI runs every node under ``torch.inference_mode()``; the loaded weights are inference
  tensors, which autograd refuses to save for backward.  The host trains through *clones* of the
  MODEL and CLIP patchers carrying identity weight *and* bias wrappers (``patching.py``).  The
  input objects, and the BaseModel / text-encoder modules they share with the clones, are never
  modified.
* ComfyUI's ``CLIPLayer.forward`` adds its residuals in place; while a text encoder runs,
  ``encode_text`` swaps in an out-of-place forward (``patching.out_of_place_clip_layers``).
* The placeholder's vectors enter the text encoder the way an ``embedding:NAME`` file does: the
  prompt is tokenised by the CLIP's own tokenizer with the placeholder resolved to the vectors
  instead of a file, so chunking, padding, the end token and prompt weights are exactly what the
  user's ``CLIPTextEncode`` of ``... embedding:NAME ...`` will produce after training, and the
  sequences stay 77 tokens long with the right pad token per encoder.
* ``denoise`` is ``BaseModel.apply_model`` (returns x0) with its keyword conditioning built by
  ``BaseModel.extra_conds`` as ComfyUI's samplers build it, so SDXL's ``y`` (pooled text + size
  embeddings) is never hard-coded here.  It is built once per prompt of a conditioning and kept on
  it (a cached conditioning, e.g. DreamBooth's frozen text, is never rebuilt).
* Two paths inside ``training()`` (``path``; outside it every call takes the second):
  ``"fast"`` (default) trains through replicas of the UNet and text encoders made once per block
  over ordinary aliases of the loaded weights (``fast.py``): no per-forward weight copies, the
  models loaded once.  ``"low_memory"`` trains through the wrapper clones above, which copy each
  weight per forward and reload every call, but stream with ComfyUI's partial loading; with
  gradient checkpointing only a block's copies are alive at a time.  ``choose_path()`` picks one
  before training starts from ``fast_path_memory()`` (what the fast path holds) and the free VRAM.
* Every method leaves inference mode for its own work, so the tensors it returns are ordinary
  tensors even when called outside ``training()`` (VAE and sampling previews); the trainer's
  own tensors and its backward pass still need ``training()``.
"""
from __future__ import annotations

import contextlib
import copy
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

import comfy.model_management
import comfy.sd

from ...trainers.families import FAMILIES
from ...trainers.formats.files import atomic_path
from ...trainers.preflight import GiB, device_budget
from ...trainers.seam import ImageMeta, ModelInfo, ParameterNaming, TextEncoderInfo
from ..shared import check_vectors, keep_source_tensors
from .detection import check_clip, check_vae, checkpoint_name, model_facts, unet_layout_of
from .fast import FastModels, FastPathMemory, estimate
from .patching import add_identity_wrappers, checkpointed_blocks, out_of_place_clip_layers
from .vae import ComfyVAE

#: stands in for the placeholder while ComfyUI's tokenizer runs (resolved to the vectors)
_MARKER = "likeness_placeholder_7f3a9c"

#: layer types whose weights a fine-tune may patch (comfy ops subclass these)
_TUNABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)

#: ``ComfyHost.path`` values: train through replicas (default) or through the wrapper clones
PATHS = ("fast", "low_memory")


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
    #: ``denoise``'s keyword conditioning per (batch, latent shape, device), built on first use
    kwargs_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.cross_attn)


def _size_conditioning(meta: ImageMeta | None) -> dict[str, int]:
    """``ImageMeta`` in the keywords ``BaseModel.extra_conds`` takes (SDXL's size embeddings)."""
    if meta is None:
        return {}
    (oh, ow), (ct, cl) = meta.original_hw, meta.crop_top_left
    d = {"width": int(ow), "height": int(oh), "crop_w": int(cl), "crop_h": int(ct)}
    if meta.target_hw is not None:
        d["target_height"], d["target_width"] = int(meta.target_hw[0]), int(meta.target_hw[1])
    return d


def _is_patched(module, pname: str) -> bool:
    return pname in getattr(module, "parametrizations", {})


def _normal_mode():
    # Not inference mode for the host's own work: returned tensors must be usable by autograd.
    return torch.inference_mode(False)


def _load(models, memory_required: float = 0) -> None:
    comfy.model_management.load_models_gpu(models, memory_required=memory_required)


class ComfyHost:
    """``trainers.seam`` ``Host``, ``Tunable`` and ``Exportable`` on ComfyUI's MODEL (ModelPatcher),
    CLIP and VAE.

    ``model`` and ``clip`` must come from the same SD1.x, SD2.x or SDXL checkpoint (patches,
    LoRAs, clip skip and model-sampling patches upstream are honoured).  ``vae`` is needed only by
    ``encode_images`` / ``decode_latents`` / ``save_checkpoint``.  ``name`` overrides the checkpoint
    name recorded in ``info`` (default: the file CheckpointLoaderSimple loaded, when known).
    ``path``: how ``training()`` trains, ``"fast"`` or ``"low_memory"`` (module doc); settable
    until the first step of a block needs the model.
    """

    def __init__(self, model, clip, vae=None, *, name: str | None = None, path: str = "fast"):
        if model is None or clip is None:
            raise ValueError("Likeness needs both the MODEL and the CLIP of a checkpoint.")
        facts = model_facts(model)
        check_clip(clip, facts.family)
        if vae is not None:
            check_vae(vae, model)
        what = type(model.model).__name__
        self.info = ModelInfo(family=facts.family, prediction=facts.prediction,
                              name=name or checkpoint_name(model), hash=None,
                              extra={"model_class": what, "clip_layer": clip.layer_idx})
        self._facts = facts
        self.device, self.compute_dtype = facts.device, facts.compute_dtype
        self.latent_channels, self.latent_scale = facts.latent_channels, facts.latent_scale
        self.latent_multiple = facts.latent_multiple
        family = FAMILIES[facts.family]
        self._encoders = tuple(TextEncoderInfo(e.key, e.width) for e in family.encoders)
        self.naming = ParameterNaming("diffusion_model.", "ldm",
                                      {key: f"{key}.transformer." for key in family.encoder_keys})

        # Trainable clones: same weights, identity wrappers -> per-forward copies (see module doc).
        self._input_model, self._input_clip = model, clip
        self._patches: dict = {}
        self._model = model.clone()
        add_identity_wrappers(self._model, self._patches)
        self._clip = clip.clone()
        add_identity_wrappers(self._clip.patcher, self._patches)
        self._vae = vae
        self._codec = ComfyVAE(vae, self._model.model, self.device) if vae is not None else None
        # Plain clones for the fast path: loaded once per training() block, then replicated.
        self._fast_model, self._fast_clip = model.clone(), clip.clone()
        self._fast: FastModels | None = None
        self._depth = 0
        self.path = path

    # ------------------------------------------------------------------ usage contract
    @contextlib.contextmanager
    def training(self) -> Iterator["ComfyHost"]:
        """Leave ComfyUI's ``torch.inference_mode()`` and enable grad for the block.

        Everything a trainer creates that autograd may save (vectors, noise, optimizer state) must
        be created inside; the host's own weights are handled by its clones.  On the fast path the
        first call that needs the model loads it and builds the replicas; leaving the outermost
        block drops them."""
        with torch.inference_mode(False), torch.enable_grad():
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._fast = None

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in PATHS:
            raise ValueError(f"path must be one of {', '.join(PATHS)}, not {value!r}")
        if self._fast is not None and value != "fast":
            raise RuntimeError("the training path cannot change after a block started on the fast path; "
                               "set it before `with host.training():`")
        self._path = value

    def _fast_models(self) -> FastModels | None:
        """The replicas this ``training()`` block trains through (built on first use), or None
        outside a block or on the low-memory path."""
        if self._depth == 0 or self._path != "fast":
            return None
        if self._fast is None:
            with _normal_mode():
                self._fast = FastModels(self._fast_model, self._fast_clip)
                self._fast.patch(self._patches)
        return self._fast

    def choose_path(self, budget_gb: float = 0.0) -> str:
        """Set ``path`` before training from the fast path's estimate: its one-time copies
        (``fast_path_memory().copied`` - none when ComfyUI holds the whole model in the compute
        dtype; everything it streams under low VRAM) may take at most half the memory budget,
        leaving the rest to the step itself, which the trainers' preflight then measures.
        ``budget_gb``: 0 = the device's free memory (none known on the CPU: fast).  Returns a
        note for the user when it chose the low-memory path, else ""."""
        budget = int(budget_gb * GiB) if budget_gb > 0 else device_budget(self.device)
        copied = self.fast_path_memory().copied if budget is not None else 0
        if budget is None or copied <= budget // 2:
            self.path = "fast"
            return ""
        self.path = "low_memory"
        return (f"memory: the fast path would copy {copied / GiB:.1f} GB of weights beside ComfyUI's model "
                f"with {budget / GiB:.1f} GB free; training on the low-memory path (slower, streams the weights)")

    def fast_path_memory(self) -> FastPathMemory:
        """Device bytes the fast path's weights take (``resident``) and how much of that it copies
        on top of ComfyUI's own loaded model (``copied``), without loading anything.  The
        low-memory path holds no replicas; its per-step copies die with each step's graph."""
        base = self._fast_model.model
        return estimate([(self._fast_model, base.diffusion_model, base.get_dtype_inference()),
                         (self._fast_clip.patcher, self._fast_clip.cond_stage_model, None)])

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
        with _normal_mode(), torch.no_grad():
            _load([self._clip.patcher])
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
        return self._facts.training_sigmas(self.device)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        codec = self._need_vae()
        if images.ndim != 4 or images.shape[-1] < 3:
            raise ValueError(f"images must be [B, H, W, 3] (ComfyUI IMAGE), got {tuple(images.shape)}")
        h, w = images.shape[1:3]
        f = self.latent_scale
        if h % f or w % f:
            raise ValueError(f"image size {w}x{h} is not a multiple of {f}; crop or resize first")
        return codec.encode(images)

    def decode_latents(self, latents: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
        return self._need_vae().decode(latents, differentiable=differentiable)

    def _need_vae(self) -> ComfyVAE:
        if self._codec is None:
            raise ValueError("This step needs the VAE of the checkpoint; connect it.")
        return self._codec

    # ------------------------------------------------------------------ text
    def _check_vectors(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return check_vectors(self._encoders, vectors)

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
            texts = [p.replace(placeholder, f" embedding:{_MARKER} ") for p in prompts]
        else:
            texts = prompts
        with _normal_mode(), torch.autocast(self.device.type, enabled=False), out_of_place_clip_layers():
            fast = self._fast_models()
            clip = fast.clip if fast is not None else self._clip
            if fast is None:
                _load([clip.patcher])
            saved = clip.tokenizer
            try:
                # our own clone's attribute; the input CLIP is untouched
                clip.tokenizer = self._tokenizer_with(vectors) if splice else saved
                conds, pooled, extra = self._encode_all(clip, texts)
            finally:
                clip.tokenizer = saved
        size = [_size_conditioning(meta[i] if meta is not None else None) for i in range(len(prompts))]
        return ComfyCond(conds, pooled, size, extra)

    def _encode_all(self, clip, texts: list[str]):
        """Each distinct text once (a DreamBooth batch repeats its instance and class prompts)."""
        conds, pooled, extra = [], [], []
        done: dict[str, int] = {}
        for t in texts:
            if t in done:
                j = done[t]
                conds.append(conds[j]), pooled.append(pooled[j]), extra.append(dict(extra[j]))
                continue
            done[t] = len(conds)
            out = clip.encode_from_tokens(clip.tokenize(t), return_pooled=True, return_dict=True)
            c, pl = out.pop("cond"), out.pop("pooled_output", None)
            conds.append(c.to(self.device))
            pooled.append(pl.to(self.device) if torch.is_tensor(pl) else pl)
            extra.append(out)
        return conds, pooled, extra

    # ------------------------------------------------------------------ denoiser
    def model_kwargs(self, cond: ComfyCond, x: torch.Tensor) -> dict[str, Any]:
        """The keyword conditioning ``apply_model`` gets for ``x``: built per prompt by
        ``BaseModel.extra_conds`` the way ComfyUI's samplers build it (``c_crossattn``; SDXL ``y``),
        then batched with ComfyUI's own cond concatenation (one prompt: repeated to the batch).
        Kept on ``cond``: a conditioning reused across steps is built once."""
        b = x.shape[0]
        if len(cond) not in (1, b):
            raise ValueError(f"conditioning for {len(cond)} prompts cannot drive a batch of {b}")
        key = (b, tuple(x.shape[1:]), x.device)
        if key not in cond.kwargs_cache:
            cond.kwargs_cache[key] = self._batched_conds(cond, x)
        return cond.kwargs_cache[key]

    def _batched_conds(self, cond: ComfyCond, x: torch.Tensor) -> dict[str, Any]:
        f, repeat = self.latent_scale, x.shape[0] if len(cond) == 1 else 1
        per = []
        for i in range(len(cond)):
            params = {"width": x.shape[-1] * f, "height": x.shape[-2] * f}
            params.update(cond.size[i])
            params.update(cond.extra[i] if i < len(cond.extra) else {})
            params.update(cross_attn=cond.cross_attn[i], device=x.device, noise=x[:1], prompt_type="positive")
            if cond.pooled[i] is not None:
                params["pooled_output"] = cond.pooled[i]
            per.append(self._model.model.extra_conds(**params))
        kwargs = {}
        for k in per[0]:
            items = [p[k].process_cond(batch_size=repeat, area=None) for p in per]
            kwargs[k] = items[0].concat(items[1:]) if len(items) > 1 else items[0].cond
        return kwargs

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: ComfyCond) -> torch.Tensor:
        with _normal_mode():
            sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
            if sigma.ndim == 0:
                sigma = sigma.expand(x.shape[0])
            sigma = sigma.reshape(-1)
            fast = self._fast_models()
            if fast is None:
                need = self._model.model.memory_required([2 * x.shape[0]] + list(x.shape[1:]))
                _load([self._model], memory_required=need)
            base, patcher = (fast.base, fast.patcher) if fast is not None else (self._model.model, self._model)
            kwargs = self.model_kwargs(cond, x)
            topts = dict(patcher.model_options.get("transformer_options", {}))
            topts.update(cond_or_uncond=[0], uuids=[uuid.uuid4()], sigmas=sigma)
            return base.apply_model(x, sigma, transformer_options=topts, **kwargs)

    def output_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        with _normal_mode():
            s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
            ones = torch.ones(s.shape[0], 1, device=s.device)
            return self.model_sampling.calculate_denoised(s, ones, torch.zeros_like(ones)).reshape(-1).to(s.device)

    # ------------------------------------------------------------------ weights (seam.Tunable)
    def _part_root(self, part: str):
        """The module tree ``part`` runs in now: the fast path's replica inside a block."""
        fast = self._fast_models()
        if part == "unet":
            return (fast.base if fast is not None else self._model.model), self.naming.unet_prefix
        if part in self.naming.encoder_prefixes:
            clip = fast.clip if fast is not None else self._clip
            return clip.cond_stage_model, self.naming.encoder_prefixes[part]
        have = ", ".join(["unet", *self.naming.encoder_prefixes])
        raise ValueError(f"no part {part!r} in this {self.info.family} model; have {have}")

    def tunable_parameters(self, part: str) -> dict[str, torch.Tensor]:
        root, prefix = self._part_root(part)
        out = {}
        for name, m in root.named_modules():
            if name.startswith(prefix) and hasattr(m, "weight_function") and isinstance(m, _TUNABLE):
                for pname in ("weight", "bias"):
                    t = m.parametrizations[pname].original if _is_patched(m, pname) else getattr(m, pname, None)
                    if isinstance(t, torch.Tensor):
                        out[f"{name}.{pname}"] = t.detach()
        return out

    @contextlib.contextmanager
    def parameter_patches(self, fns: dict):
        """The patches ride on the wrappers our clones already carry (``PatchableWrapper``):
        nothing is added to the input MODEL/CLIP, and leaving the block removes every patch."""
        known = set(self._model.weight_wrapper_patches) | set(self._clip.patcher.weight_wrapper_patches)
        unknown = sorted(set(fns) - known)
        if unknown:
            raise ValueError(f"cannot patch {unknown[:3]}: not a weight or bias of this model's layers")
        self._patches.update(fns)
        try:
            fast = self._fast_models()
            if fast is not None:  # the replicas (built now or earlier in the block) take them too
                fast.patch(fns)
            yield
        finally:
            for k in fns:
                self._patches.pop(k, None)
            if self._fast is not None:
                self._fast.unpatch(fns)

    # ---- module_branches (seam.Tunable): LoRA as a branch on the activations ----------------
    @contextlib.contextmanager
    def module_branches(self, fns: dict):
        """Forward hooks on ComfyUI's own layers (``comfy.ops`` Linear / 1x1 Conv2d, which cast
        their weights per call; the hook sees the layer's input and its finished output).  The
        modules are shared with every other clone of the user's MODEL/CLIP, so the hooks exist
        only while the block runs and are removed in ``finally``; every name is checked first."""
        layers = {name: self._branch_layer(name) for name in fns}
        handles = []
        try:
            for name, layer in layers.items():
                handles.append(layer.register_forward_hook(self._branch_hook(fns[name])))
            yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _branch_hook(fn):
        def hook(_module, args, out):
            return fn(args[0], out)
        return hook

    def _branch_layer(self, name: str) -> torch.nn.Module:
        prefixes = {"unet": self.naming.unet_prefix, **self.naming.encoder_prefixes}
        part = next((k for k, p in prefixes.items() if name.startswith(p)), None)
        layer = None
        if part is not None and name.endswith(".weight"):
            root, _ = self._part_root(part)
            try:
                layer = root.get_submodule(name[: -len(".weight")])
            except AttributeError:
                layer = None
        linear = isinstance(layer, torch.nn.Linear)
        conv1 = isinstance(layer, torch.nn.Conv2d) and tuple(layer.kernel_size) == (1, 1)
        if not (linear or conv1) or not hasattr(layer, "weight_function"):
            raise ValueError(f"cannot branch {name!r}: not the weight of a Linear or 1x1 conv layer of this model")
        return layer

    def unet_layout(self):
        return unet_layout_of(self._model.model.model_config.unet_config)

    def gradient_checkpointing(self):
        """Recompute each UNet block (and text-encoder layer) in backward while the block runs."""
        return checkpointed_blocks(self._part_root("unet")[0].diffusion_model)

    # ------------------------------------------------------------------ results (seam.Exportable)
    def with_lora(self, lora_state_dict: dict[str, torch.Tensor], strength_model: float = 1.0,
                  strength_clip: float = 1.0):
        """(MODEL, CLIP) clones of the *input* objects with a kohya LoRA applied exactly as
        ``LoraLoader`` applies a file (``comfy.sd.load_lora_for_models``)."""
        return comfy.sd.load_lora_for_models(self._input_model, self._input_clip, lora_state_dict,
                                             strength_model, strength_clip)

    def with_deltas(self, deltas: dict[str, torch.Tensor]):
        """(MODEL, CLIP) clones of the input objects with a full fine-tune's deltas as ComfyUI
        ``diff`` patches (the weights themselves are never touched)."""
        model, clip = self._input_model.clone(), self._input_clip.clone()
        prefix = self.naming.unet_prefix
        unet = {k: (d,) for k, d in deltas.items() if k.startswith(prefix)}
        text = {k: (d,) for k, d in deltas.items() if not k.startswith(prefix)}
        missing = len(unet) - len(model.add_patches(unet, 1.0)) if unet else 0
        if text:
            missing += len(text) - len(clip.add_patches(text, 1.0))
        if missing:
            raise ValueError(f"{missing} trained parameters have no place in this model; nothing applied")
        return model, clip

    def save_checkpoint(self, path, deltas: dict[str, torch.Tensor], metadata: dict | None = None):
        """The model with ``deltas`` as one checkpoint file, written by ComfyUI's own
        ``save_checkpoint`` (what its CheckpointSave node writes) to a temp name, then renamed;
        every tensor nobody trained is then the source file's own (``keep_source_tensors``)."""
        model, clip = self.with_deltas({k: d.to(self.device) for k, d in deltas.items()})
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _normal_mode(), atomic_path(path) as tmp:
                comfy.sd.save_checkpoint(str(tmp), model, clip, self._vae, metadata=meta)
                keep_source_tensors(tmp, self._source_file())
        finally:
            # Saving loaded the patched clones, which write their patches into the shared weights
            # (backed up).  Loading our own clones again restores the originals.
            _load([self._model, self._clip.patcher])
        return path

    def _source_file(self) -> Path | None:
        """The checkpoint file CheckpointLoaderSimple read this MODEL from (None otherwise)."""
        init = getattr(self._model, "cached_patcher_init", None)
        try:
            return Path(init[1][0])
        except (TypeError, IndexError):
            return None

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
        return self._facts.model_sampling


__all__ = ["ComfyHost", "ComfyCond"]
