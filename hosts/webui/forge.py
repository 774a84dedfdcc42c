"""The Forge host: the seam (``trainers/seam.py``: ``Host``, ``Tunable``, ``Exportable``) on the
model Stable Diffusion WebUI Forge has loaded (``shared.sd_model``, a ``ForgeDiffusionEngine``) for
SD1.x, SD2.x and SDXL.

How the tab uses it::

    host = ForgeHost(shared.sd_model)     # cheap: patcher clones, never mutates the engine
    with host.training():
        result = train_textual_inversion(host, images, cfg, progress)

Why it looks the way it does:

* Forge keeps the model as ComfyUI-derived patchers (``forge_objects``: ``UnetPatcher`` over a
  ``KModel``, ``CLIP``, ``VAE``).  The host works on clones of the UNet and CLIP patchers and loads
  them through Forge's own memory manager, which re-applies the LoRAs of *that* patcher
  (``refresh_loras``): the host trains on the model exactly as the user's generation sees it.
* The weights are inference tensors; every forward goes through ``common.substituted_weights``
  (ordinary copies in the module tables for the call, originals back in ``finally``).
* The prompt is encoded by the engine's own ``ClassicTextProcessingEngine`` (chunking, emphasis,
  clip skip, padding), with the placeholder resolved the way Forge resolves an embedding file's
  name: a copy of its embedding database knows one more embedding whose vectors are the trainer's
  tensors, so the spliced conditioning is what ``... <name> ...`` will give after training.
* ``denoise`` is ``KModel.apply_model`` with the keywords Forge's sampler builds from the engine's
  conditioning (``c_crossattn``; SDXL ``y`` = pooled text + size embeddings by the engine's own
  ``embedder``).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from backend import memory_management
from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet

from ...trainers.families import FAMILIES
from ...trainers.formats.files import atomic_path
from ...trainers.formats.unet_names import unet_layout_of
from ...trainers.seam import ImageMeta, ModelInfo, ParameterNaming, TextEncoderInfo
from ..shared import (check_images, check_prompts, check_vectors, checkpointed_forwards, keep_source_tensors,
                      per_sample, unet_blocks)
from . import common


def _family(engine) -> str:
    for flag, family in (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(engine, flag, False):
            if family == "sdxl" and not hasattr(engine, "text_processing_engine_l"):
                break  # the SDXL refiner: one encoder, aesthetic-score conditioning
            return family
    raise ValueError(f"Likeness trains SD1.x, SD2.x and SDXL models; the loaded model is a "
                     f"{type(engine).__name__}. Select one of those checkpoints in the WebUI first.")


def _text_engines(engine, family: str) -> dict[str, Any]:
    if family == "sdxl":
        return {"clip_l": engine.text_processing_engine_l, "clip_g": engine.text_processing_engine_g}
    return {FAMILIES[family].encoder_keys[0]: engine.text_processing_engine}


class _Vectors:
    """What Forge's embedding database holds for a file (``Embedding``), over the trainer's tensors."""

    def __init__(self, name: str, vec: dict[str, torch.Tensor]):
        self.name, self.vec = name, vec
        self.vectors = next(iter(vec.values())).shape[0]
        self.shape = next(iter(vec.values())).shape[-1]
        self.step = self.sd_checkpoint = self.sd_checkpoint_name = None


class ForgeHost:
    """``trainers.seam`` ``Host``, ``Tunable`` and ``Exportable`` on Forge's loaded model.

    ``engine`` is ``shared.sd_model``; ``objects`` overrides its ``forge_objects`` (a result of
    ``with_lora`` / ``with_deltas``).  ``name`` is the checkpoint name recorded in files."""

    def __init__(self, engine, objects=None, *, name: str | None = None):
        family = _family(engine)
        objects = objects if objects is not None else engine.forge_objects
        self._engine, self._text = engine, _text_engines(engine, family)
        self._unet, self._clip, self._vae = objects.unet.clone(), objects.clip.clone(), objects.vae
        self._objects = objects
        kmodel = self._unet.model
        predictor = kmodel.predictor
        prediction = {"epsilon": "eps", "eps": "eps", "v_prediction": "v"}.get(predictor.prediction_type)
        if prediction is None:
            raise ValueError(f"Likeness trains eps and v models; this one predicts {predictor.prediction_type!r}")
        ckpt = getattr(engine, "sd_checkpoint_info", None)
        self.info = ModelInfo(family=family, prediction=prediction,
                              name=name or getattr(ckpt, "name_for_extra", None) or getattr(ckpt, "name", "forge"),
                              hash=getattr(ckpt, "shorthash", None), extra={"model_class": type(engine).__name__})
        self.device = torch.device(memory_management.get_torch_device())
        self.compute_dtype = kmodel.computation_dtype
        spec = FAMILIES[family]
        self.latent_channels, self.latent_scale = spec.latent_channels, spec.latent_scale
        self.latent_multiple = 2 ** (len(kmodel.config.unet_config["channel_mult"]) - 1)  # one halving per level
        self._encoders = tuple(TextEncoderInfo(e.key, e.width) for e in spec.encoders)
        self.naming = ParameterNaming("diffusion_model.", "ldm", {k: f"{k}.transformer." for k in spec.encoder_keys})
        self._unet_fns: dict = {}  # parameter_patches' functions while active
        self._text_fns: dict = {}

    # ------------------------------------------------------------------ usage contract
    @contextlib.contextmanager
    def training(self) -> Iterator["ForgeHost"]:
        """Leave the WebUI's inference mode and enable grad for the block."""
        with torch.inference_mode(False), torch.enable_grad():
            yield self

    def _load(self, *patchers) -> None:
        # Forge's memory manager; loading our clone re-applies its LoRAs (refresh_loras)
        memory_management.load_models_gpu(list(patchers))

    # ------------------------------------------------------------------ text
    def text_encoders(self) -> Sequence[TextEncoderInfo]:
        return self._encoders

    def _token_ids(self, key: str, text: str) -> list[int]:
        return list(self._text[key].tokenizer(text, truncation=False, add_special_tokens=False)["input_ids"])

    def check_placeholder(self, name: str) -> None:
        ok = isinstance(name, str) and name.strip() and not any(c.isspace() for c in name)
        common.check_placeholder_tokens(name, {k: self._token_ids(k, name) for k in self._text} if ok else {})

    def token_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        out = {}
        with torch.inference_mode(False), torch.no_grad():
            self._load(self._clip.patcher)
            for key, eng in self._text.items():
                table = eng.text_encoder.transformer.text_model.embeddings.token_embedding.wrapped
                ids = torch.tensor(self._token_ids(key, text), dtype=torch.long, device=table.weight.device)
                out[key] = table(ids).to(self.device, torch.float32).clone()
        return out

    def _encode_one(self, key: str, texts: list[str], extra: _Vectors | None):
        """Forge's ``ClassicTextProcessingEngine.__call__`` on ``texts``, with ``extra`` known to a
        copy of its embedding database (the encoder's wrapper reads the fixes off the original)."""
        eng = copy.copy(self._text[key])
        if extra is not None:
            db = copy.copy(eng.embeddings)
            db.ids_lookup = {k: list(v) for k, v in db.ids_lookup.items()}
            db.word_embeddings = dict(db.word_embeddings)
            db.register_embedding_by_name(extra, extra.name)
            eng.embeddings = db
        chunks, _ = eng.process_texts(texts)
        zs, pooled = [], None
        for i in range(max(len(c) for c in chunks)):
            batch = [c[i] if i < len(c) else eng.empty_chunk() for c in chunks]
            self._text[key].embeddings.fixes = [x.fixes for x in batch]
            z = eng.process_tokens([x.tokens for x in batch], [x.multipliers for x in batch])
            pooled = getattr(z, "pooled", None) if pooled is None else pooled
            zs.append(z)
        return torch.hstack(zs), pooled

    def encode_text(self, prompts: Sequence[str], placeholder: str | None = None,
                    vectors: dict[str, torch.Tensor] | None = None,
                    meta: Sequence[ImageMeta] | None = None) -> dict[str, Any]:
        prompts = check_prompts(prompts, meta)
        extra = None
        if placeholder and vectors is not None:
            extra = _Vectors(placeholder, check_vectors(self._encoders, vectors))
        with torch.inference_mode(False), common.substituted_weights(self._clip.cond_stage_model, self._text_fns):
            self._load(self._clip.patcher)
            out = {k: self._encode_one(k, prompts, extra) for k in self._text}
        if self.info.family != "sdxl":
            return {"crossattn": next(iter(out.values()))[0].to(self.device)}
        cross = torch.cat([out["clip_l"][0], out["clip_g"][0]], dim=2).to(self.device)
        return {"crossattn": cross, "pooled": out["clip_g"][1].to(self.device), "meta": meta}

    def _size_vector(self, cond: dict, x: torch.Tensor) -> torch.Tensor:
        """SDXL's ``y``: pooled text + the six size embeddings of Forge's SDXL engine."""
        f, b = self.latent_scale, x.shape[0]
        rows = []
        for i in range(b):
            m = cond["meta"][i % len(cond["meta"])] if cond.get("meta") else None
            h, w = (x.shape[-2] * f, x.shape[-1] * f) if m is None else m.original_hw
            ct, cl = (0, 0) if m is None else m.crop_top_left
            th, tw = (x.shape[-2] * f, x.shape[-1] * f) if m is None or m.target_hw is None else m.target_hw
            sizes = [self._engine.embedder(torch.Tensor([v])) for v in (h, w, ct, cl, th, tw)]
            rows.append(torch.flatten(torch.cat(sizes)))
        pooled = cond["pooled"]
        pooled = pooled if pooled.shape[0] == b else pooled.expand(b, -1)
        return torch.cat([pooled, torch.stack(rows).to(pooled)], dim=1)

    # ------------------------------------------------------------------ images
    def training_sigmas(self) -> torch.Tensor:
        return self._unet.model.predictor.sigmas.detach().to(self.device, torch.float32).clone()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.latent_scale)
        with torch.inference_mode(False), torch.no_grad():
            z = self._vae.encode(images[..., :3].float())
            return self._vae.first_stage_model.process_in(z).to(self.device, torch.float32).clone()

    def decode_latents(self, latents: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
        vae = self._vae
        grad = contextlib.nullcontext() if differentiable else torch.no_grad()
        with torch.inference_mode(False), grad, common.substituted_weights(vae.first_stage_model):
            self._load(vae.patcher)
            z = vae.first_stage_model.process_out(latents.to(vae.device, vae.vae_dtype))
            px = vae.first_stage_model.decode(z).float()
            px = ((px + 1) / 2).clamp(0, 1).movedim(1, -1)
        return px.to(self.device) if differentiable else px.detach().cpu()

    # ------------------------------------------------------------------ denoiser
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        with torch.inference_mode(False):
            sigma, context = per_sample(x, sigma, cond["crossattn"])
            kwargs = {"c_crossattn": context}
            if self.info.family == "sdxl":
                kwargs["y"] = self._size_vector(cond, x)
            self._load(self._unet)
            topts = dict(self._unet.model_options.get("transformer_options", {}))
            with common.substituted_weights(self._unet.model, self._unet_fns), self._saved_copies():
                return self._unet.model.apply_model(x, sigma, transformer_options=topts, **kwargs)

    def _saved_copies(self):
        """Forge's transformer blocks add their residuals in place (``x += n``) into the block's
        input after a norm saved it.  Once that input is part of the graph - always when weights
        train, and for vectors from a stack's second block on (SDXL's depth 2 and 10) - autograd
        would refuse the modified tensor, so it keeps its own copy of exactly those saved tensors."""
        if not torch.is_grad_enabled():
            return contextlib.nullcontext()
        return common.block_input_copies(self._unet.model.diffusion_model, "BasicTransformerBlock")

    def output_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
        ones = torch.ones(s.shape[0], 1, device=s.device)
        return self._unet.model.predictor.calculate_denoised(s, ones, torch.zeros_like(ones)).reshape(-1)

    # ------------------------------------------------------------------ weights (seam.Tunable)

    def _part_root(self, part: str):
        if part == "unet":
            return self._unet.model, self.naming.unet_prefix
        if part in self.naming.encoder_prefixes:
            return self._clip.cond_stage_model, self.naming.encoder_prefixes[part]
        raise ValueError(f"no part {part!r} in this {self.info.family} model; have "
                         + ", ".join(["unet", *self.naming.encoder_prefixes]))

    def tunable_parameters(self, part: str) -> dict[str, torch.Tensor]:
        root, prefix = self._part_root(part)
        return common.tunable_tensors(root, prefix)

    @contextlib.contextmanager
    def parameter_patches(self, fns: dict):
        known = set(common.tunable_tensors(self._unet.model)) | set(common.tunable_tensors(self._clip.cond_stage_model))
        unknown = sorted(set(fns) - known)
        if unknown:
            raise ValueError(f"cannot patch {unknown[:3]}: not a weight or bias of this model's layers")
        unet = {k: f for k, f in fns.items() if k.startswith(self.naming.unet_prefix)}
        saved = self._unet_fns, self._text_fns
        self._unet_fns = {**saved[0], **unet}
        self._text_fns = {**saved[1], **{k: f for k, f in fns.items() if k not in unet}}
        try:
            yield
        finally:
            self._unet_fns, self._text_fns = saved

    @contextlib.contextmanager
    def module_branches(self, fns: dict):
        unet = {k: f for k, f in fns.items() if k.startswith(self.naming.unet_prefix)}
        text = {k: f for k, f in fns.items() if k not in unet}
        with common.activation_branches(self._unet.model, unet), \
                common.activation_branches(self._clip.cond_stage_model, text):
            yield

    def unet_layout(self):
        return unet_layout_of(self._unet.model.config.unet_config)

    def gradient_checkpointing(self):
        return checkpointed_forwards(unet_blocks(self._unet.model.diffusion_model))

    # ------------------------------------------------------------------ results (seam.Exportable)
    def with_lora(self, lora_state_dict: dict[str, torch.Tensor], strength_model: float = 1.0,
                  strength_clip: float = 1.0, filename: str = "likeness"):
        """The input ``forge_objects`` with a kohya LoRA added as Forge's LoRA extension adds a file
        (``sd_forge_lora/networks.py``: key maps, ``load_lora``, patcher clones' ``add_patches``);
        Forge applies the patches when the clone is loaded for sampling."""
        unet_keys = model_lora_keys_unet(self._objects.unet.model)
        clip_keys = model_lora_keys_clip(self._objects.clip.cond_stage_model)
        lora_unet, rest = load_lora(dict(lora_state_dict), unet_keys)
        lora_clip, rest = load_lora(rest, clip_keys)
        if rest:
            raise ValueError(f"{len(rest)} LoRA tensors match no layer of this model (e.g. {sorted(rest)[:2]})")
        return self._objects_with(lora_unet, lora_clip, filename, strength_model, strength_clip)

    def _objects_with(self, unet_patches: dict, clip_patches: dict, filename: str, s_model=1.0, s_clip=1.0):
        objects = self._objects.shallow_copy()
        objects.unet, objects.clip = self._objects.unet.clone(), self._objects.clip.clone()
        if unet_patches:
            objects.unet.add_patches(filename=filename, patches=unet_patches, strength_patch=s_model)
        if clip_patches:
            objects.clip.add_patches(filename=filename, patches=clip_patches, strength_patch=s_clip)
        return objects

    def with_deltas(self, deltas: dict[str, torch.Tensor]):
        """The input ``forge_objects`` with a full fine-tune's deltas as Forge ``diff`` patches."""
        prefix = self.naming.unet_prefix
        unet = {k: (d,) for k, d in deltas.items() if k.startswith(prefix)}
        text = {k: (d,) for k, d in deltas.items() if not k.startswith(prefix)}
        known = set(common.tunable_tensors(self._unet.model)) | set(common.tunable_tensors(self._clip.cond_stage_model))
        missing = sorted(set(deltas) - known)
        if missing:
            raise ValueError(f"{len(missing)} trained parameters have no place in this model; nothing applied")
        return self._objects_with(unet, text, "likeness-deltas")

    def save_checkpoint(self, path, deltas: dict[str, torch.Tensor], metadata: dict | None = None):
        """The model with ``deltas`` added, written by the engine's own ``save_checkpoint`` (the
        file Forge's checkpoint merger writes) while the deltas are substituted in, then stamped
        with ``metadata``, the tensors nobody trained as the source file has them; temp file, then rename."""
        fns = {k: (lambda w, d=d: w + d.to(w.device, w.dtype)) for k, d in deltas.items()}
        unet = {k: f for k, f in fns.items() if k.startswith(self.naming.unet_prefix)}
        text = {k: f for k, f in fns.items() if k not in unet}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = copy.copy(self._engine)
        engine.forge_objects = self._objects
        with torch.inference_mode(False), torch.no_grad(), atomic_path(path) as tmp, \
                common.substituted_weights(self._unet.model, unet), \
                common.substituted_weights(self._clip.cond_stage_model, text):
            self._load(self._unet, self._clip.patcher)
            engine.save_checkpoint(str(tmp))
            keep_source_tensors(tmp, getattr(getattr(self._engine, "sd_checkpoint_info", None), "filename", None),
                                metadata=metadata or {})
        return path

    # ------------------------------------------------------------------ tests
    def frozen_parameters(self) -> dict[str, torch.Tensor]:
        out = {f"unet.{k}": v.detach() for k, v in self._unet.model.diffusion_model.named_parameters()}
        out.update({f"text.{k}": v.detach() for k, v in self._clip.cond_stage_model.named_parameters()})
        out.update({f"vae.{k}": v.detach() for k, v in self._vae.first_stage_model.named_parameters()})
        return out


__all__ = ["ForgeHost"]
