"""The AUTOMATIC1111 host: the seam (``trainers/seam.py``: ``Host``, ``Tunable``, ``Exportable``) on
the model AUTOMATIC1111's Stable Diffusion WebUI has loaded (``shared.sd_model``: an LDM
``LatentDiffusion``), for SD1.x.

How the tab uses it::

    host = A1111Host(shared.sd_model)     # cheap: references, never mutates the model
    with host.training():
        result = train_textual_inversion(host, images, cfg, progress)

Why it looks the way it does:

* A1111 keeps one model object, hijacked in place (``modules/sd_hijack.py``): the text encoder is
  wrapped by ``FrozenCLIPEmbedderWithCustomWords`` (chunking, emphasis, clip skip, embeddings by
  name) and its token embedding by ``EmbeddingsWithFixes``.  The host encodes prompts with a copy
  of that wrapper whose ``hijack`` sees a copy of the embedding database knowing one more
  embedding (A1111's own ``Embedding``, over the trainer's tensors): the spliced conditioning is
  what ``... <name> ...`` gives after training, and the WebUI's database and generation settings
  are not touched.
* Every forward that may need gradients runs through ``common.substituted_weights`` (ordinary
  copies in the module tables for the call, the stored ``Parameter`` objects back in ``finally``),
  so the user's weights never change and never collect a gradient.
* ``denoise`` is k-diffusion's ``CompVisDenoiser`` / ``CompVisVDenoiser`` over the model, the
  wrapper A1111's own samplers use.
* ``with_lora`` / ``with_deltas`` return another ``A1111Host`` over the same model computing with
  the changes (A1111's own LoRA loading merges into the loaded weights; the host never does).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from k_diffusion import external as kdiff
from modules import devices
from modules.textual_inversion.textual_inversion import Embedding

from ...trainers.families import FAMILIES
from ...trainers.formats.files import atomic_path
from ...trainers.formats.kohya_lora import lora_layers, weight_delta
from ...trainers.formats.unet_names import UNetLayout
from ...trainers.seam import ImageMeta, ModelInfo, ParameterNaming, TextEncoderInfo
from ..shared import (check_images, check_prompts, check_vectors, checkpointed_forwards, keep_source_tensors,
                      per_sample, unet_blocks)
from . import common

#: where a hijacked model's state dict names differ from the checkpoint's (A1111's wrappers)
_HIJACK_KEYS = ((".token_embedding.wrapped.", ".token_embedding."), ("cond_stage_model.wrapped.", "cond_stage_model."))


def _family(model) -> str:
    if getattr(model, "is_sd1", False) and type(model.cond_stage_model).__name__ == "FrozenCLIPEmbedderWithCustomWords":
        return "sd1"
    kind = "SDXL" if getattr(model, "is_sdxl", False) else "SD2.x" if getattr(model, "is_sd2", False) \
        else type(model).__name__
    raise ValueError(f"Likeness trains SD1.x checkpoints inside AUTOMATIC1111 (the loaded model is {kind}). "
                     "Select an SD1.x checkpoint, or train SD2.x/SDXL in Stable Diffusion WebUI Forge or with "
                     "the `likeness` command line.")


def _has_attention(block: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "SpatialTransformer" for m in block.children())


def _layout(unet) -> UNetLayout:
    """The LDM UNet's block layout (res blocks per level, which levels attend), read off its modules."""
    nrb = [int(n) for n in unet.num_res_blocks]
    down, i = [], 1
    for n in nrb:
        down.append(any(_has_attention(unet.input_blocks[i + j]) for j in range(n)))
        i += n + 1
    up, i = [], 0
    for n in reversed(nrb):
        up.append(any(_has_attention(unet.output_blocks[i + j]) for j in range(n + 1)))
        i += n + 1
    return UNetLayout(tuple(nrb), tuple(up), tuple(down))


class _Hijack:
    """What the text wrapper reads off ``sd_hijack.model_hijack``, with our own embedding database
    and generation parameters; ``fixes`` go through the shared object, where A1111's
    ``EmbeddingsWithFixes`` reads them."""

    def __init__(self, base, embedding_db):
        self._base, self.embedding_db = base, embedding_db
        self.extra_generation_params, self.comments = {}, []

    @property
    def fixes(self):
        return self._base.fixes

    @fixes.setter
    def fixes(self, value):
        self._base.fixes = value


class A1111Host:
    """``trainers.seam`` ``Host``, ``Tunable`` and ``Exportable`` on AUTOMATIC1111's loaded model.

    ``model`` is ``shared.sd_model``; ``deltas`` are weight changes this host computes with (a
    result of ``with_lora`` / ``with_deltas``).  ``name`` is the checkpoint name recorded in files."""

    def __init__(self, model, deltas: dict[str, torch.Tensor] | None = None, *, name: str | None = None):
        family = _family(model)
        if getattr(model, "lowvram", False):
            # --medvram/--lowvram move each module to the GPU from a forward hook and remember which
            # one is there; weights read through copies would be moved instead of the stored ones
            raise ValueError("Likeness cannot train while AUTOMATIC1111 runs with --medvram or --lowvram (the "
                             "WebUI moves the model's weights between devices during every step). Restart it "
                             "without them, or train in Stable Diffusion WebUI Forge or with the `likeness` CLI.")
        if getattr(model, "parameterization", None) not in ("eps", "v"):
            raise ValueError(f"Likeness trains eps and v models; this one predicts {model.parameterization!r}")
        self._model, self._wrapper = model, model.cond_stage_model
        self._base = dict(deltas or {})
        self._denoiser = (kdiff.CompVisVDenoiser if model.parameterization == "v" else kdiff.CompVisDenoiser)(model)
        ckpt = getattr(model, "sd_checkpoint_info", None)
        self.info = ModelInfo(family=family, prediction="v" if model.parameterization == "v" else "eps",
                              name=name or getattr(ckpt, "name_for_extra", None) or "a1111",
                              hash=getattr(ckpt, "shorthash", None), extra={"model_class": type(model).__name__})
        unet = model.model.diffusion_model
        self.device = torch.device(devices.device)
        self.compute_dtype = next(unet.parameters()).dtype
        spec = FAMILIES[family]
        self.latent_channels, self.latent_scale = spec.latent_channels, spec.latent_scale
        self.latent_multiple = 2 ** (len(unet.num_res_blocks) - 1)  # one halving per level
        self._encoders = tuple(TextEncoderInfo(e.key, e.width) for e in spec.encoders)
        key = spec.encoder_keys[0]
        self.naming = ParameterNaming("diffusion_model.", "ldm", {key: f"{key}.transformer."})
        # the parts a fine-tune may change, each a module tree whose names carry the naming's prefix
        self._roots = {"unet": model.model, key: torch.nn.ModuleDict({key: self._wrapper.wrapped})}
        self._fns: dict = {}  # parameter_patches' functions while active

    # ------------------------------------------------------------------ usage contract
    @contextlib.contextmanager
    def training(self) -> Iterator["A1111Host"]:
        """Leave the WebUI's inference/no-grad mode for the block."""
        with torch.inference_mode(False), torch.enable_grad():
            yield self

    def _weights(self, part: str):
        """The weights of ``part`` as they compute now: the stored ones read through this host's
        deltas, then through the active patches."""
        def through(delta, patch):
            def read(w):
                w = w if delta is None else w + delta.to(w.device, w.dtype)
                return w if patch is None else patch(w)
            return read

        names = [n for n in set(self._base) | set(self._fns) if n.startswith(self._prefixes(part))]
        fns = {n: through(self._base.get(n), self._fns.get(n)) for n in names}
        return common.substituted_weights(self._roots[part], fns)

    def _prefixes(self, part: str) -> tuple[str, ...]:
        return (self.naming.unet_prefix,) if part == "unet" else (self.naming.encoder_prefixes[part],)

    # ------------------------------------------------------------------ text
    def text_encoders(self) -> Sequence[TextEncoderInfo]:
        return self._encoders

    def _token_ids(self, text: str) -> list[int]:
        return list(self._wrapper.tokenize([text])[0])

    def check_placeholder(self, name: str) -> None:
        ok = isinstance(name, str) and name.strip() and not any(c.isspace() for c in name)
        common.check_placeholder_tokens(name, {e.key: self._token_ids(name) for e in self._encoders} if ok else {})

    def token_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        table = self._wrapper.wrapped.transformer.text_model.embeddings.token_embedding.wrapped
        with torch.inference_mode(False), torch.no_grad():
            ids = torch.tensor(self._token_ids(text), dtype=torch.long, device=table.weight.device)
            return {self._encoders[0].key: table(ids).to(self.device, torch.float32).clone()}

    def _database(self, extra: Embedding | None):
        """A copy of the WebUI's embedding database, plus ``extra``."""
        db = copy.copy(self._wrapper.hijack.embedding_db)
        db.ids_lookup = {k: list(v) for k, v in db.ids_lookup.items()}
        db.word_embeddings = dict(db.word_embeddings)
        if extra is not None:
            db.register_embedding(extra, self._model)
        return db

    def encode_text(self, prompts: Sequence[str], placeholder: str | None = None,
                    vectors: dict[str, torch.Tensor] | None = None,
                    meta: Sequence[ImageMeta] | None = None) -> dict[str, Any]:
        """``{"crossattn": [B, 77k, 768]}`` by the WebUI's own text wrapper (SD1 has no size
        conditioning: ``meta`` is only checked)."""
        prompts = check_prompts(prompts, meta)
        extra = None
        if placeholder and vectors is not None:
            vec = check_vectors(self._encoders, vectors)[self._encoders[0].key]
            extra = Embedding(vec, placeholder)
            extra.vectors, extra.shape = vec.shape[0], vec.shape[-1]
        wrapper = copy.copy(self._wrapper)
        wrapper.hijack = _Hijack(self._wrapper.hijack, self._database(extra))
        with torch.inference_mode(False), self._weights(self._encoders[0].key):
            return {"crossattn": wrapper(prompts).to(self.device)}

    # ------------------------------------------------------------------ images
    def training_sigmas(self) -> torch.Tensor:
        return self._denoiser.sigmas.detach().to(self.device, torch.float32).clone()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.latent_scale)
        vae = self._model.first_stage_model
        x = images[..., :3].movedim(-1, 1).to(devices.device, devices.dtype_vae) * 2 - 1
        with torch.inference_mode(False), torch.no_grad():
            z = vae.encode(x).mode() * self._model.scale_factor
        return z.to(self.device, torch.float32).clone()

    def decode_latents(self, latents: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
        vae = self._model.first_stage_model
        grad = contextlib.nullcontext() if differentiable else torch.no_grad()
        with torch.inference_mode(False), grad, common.substituted_weights(vae):
            z = latents.to(devices.device, devices.dtype_vae) / self._model.scale_factor
            px = ((vae.decode(z).float() + 1) / 2).clamp(0, 1).movedim(1, -1)
        return px.to(self.device) if differentiable else px.detach().cpu()

    # ------------------------------------------------------------------ denoiser
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        with torch.inference_mode(False):
            sigma, context = per_sample(x, sigma, cond["crossattn"])
            with self._weights("unet"):
                return self._denoiser(x, sigma, cond={"c_crossattn": [context]})

    def output_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
        return -s / torch.sqrt(s ** 2 + 1) if self.info.prediction == "v" else -s

    # ------------------------------------------------------------------ weights (seam.Tunable)
    def _part(self, part: str):
        if part not in self._roots:
            raise ValueError(f"no part {part!r} in this {self.info.family} model; have {', '.join(self._roots)}")
        return self._roots[part]

    def tunable_parameters(self, part: str) -> dict[str, torch.Tensor]:
        return common.tunable_tensors(self._part(part), self._prefixes(part)[0])

    def _known(self) -> set[str]:
        return {n for part in self._roots for n in self.tunable_parameters(part)}

    @contextlib.contextmanager
    def parameter_patches(self, fns: dict):
        unknown = sorted(set(fns) - self._known())
        if unknown:
            raise ValueError(f"cannot patch {unknown[:3]}: not a weight or bias of this model's layers")
        saved, self._fns = self._fns, {**self._fns, **fns}
        try:
            yield
        finally:
            self._fns = saved

    @contextlib.contextmanager
    def module_branches(self, fns: dict):
        prefixes = tuple(p for part in self._roots for p in self._prefixes(part))
        stray = sorted(k for k in fns if not k.startswith(prefixes))
        if stray:
            raise ValueError(f"cannot branch {stray[:3]}: not the weight of a layer of this model")
        with contextlib.ExitStack() as stack:
            for part, root in self._roots.items():
                mine = {k: f for k, f in fns.items() if k.startswith(self._prefixes(part))}
                stack.enter_context(common.activation_branches(root, mine))
            yield

    def unet_layout(self) -> UNetLayout:
        return _layout(self._model.model.diffusion_model)

    def gradient_checkpointing(self):
        return checkpointed_forwards(unet_blocks(self._model.model.diffusion_model))

    # ------------------------------------------------------------------ results (seam.Exportable)
    def with_lora(self, lora_state_dict: dict[str, torch.Tensor], strength_model: float = 1.0,
                  strength_clip: float = 1.0, filename: str = "likeness") -> "A1111Host":
        """A host over the same model computing with a kohya LoRA added (``strength · alpha / rank ·
        up @ down`` per layer, named by the project's kohya reader against this model's layers)."""
        names = [n[: -len(".weight")] for n in self._known() if n.endswith(".weight")]
        layers = lora_layers({k: v.detach().cpu() for k, v in lora_state_dict.items()}, family=self.info.family,
                             layout=self.unet_layout(), module_names=names, naming=self.naming, source=filename)
        unet = self.naming.unet_prefix
        return self.with_deltas({f"{n}.weight": weight_delta(*layer) * (strength_model if n.startswith(unet)
                                                                        else strength_clip)
                                 for n, layer in layers.items()})

    def with_deltas(self, deltas: dict[str, torch.Tensor]) -> "A1111Host":
        """A host over the same model computing with a full fine-tune's ``deltas`` (on top of this
        host's own); the model is not changed."""
        missing = sorted(set(deltas) - self._known())
        if missing:
            raise ValueError(f"{len(missing)} trained parameters have no place in this model; nothing applied")
        merged = dict(self._base)
        for k, d in deltas.items():
            merged[k] = d.detach().float().cpu() + (merged[k] if k in merged else 0)
        return A1111Host(self._model, merged, name=self.info.name)

    def save_checkpoint(self, path, deltas: dict[str, torch.Tensor], metadata: dict | None = None):
        """The model with this host's and ``deltas``' changes, in the checkpoint layout A1111 loads
        (its wrappers' names undone), stamped with ``metadata``, the tensors nobody trained as the
        source file has them; temp file, then rename."""
        import safetensors.torch as sf

        host = self.with_deltas(deltas)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.inference_mode(False), torch.no_grad(), host._weights("unet"), \
                host._weights(self._encoders[0].key):
            sd = {}
            for k, v in self._model.state_dict().items():
                for old, new in _HIJACK_KEYS:
                    k = k.replace(old, new)
                sd[k] = v.detach().cpu().contiguous().clone()
        with atomic_path(path) as tmp:
            sf.save_file(sd, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
            keep_source_tensors(tmp, getattr(getattr(self._model, "sd_checkpoint_info", None), "filename", None))
        return path

    # ------------------------------------------------------------------ tests
    def frozen_parameters(self) -> dict[str, torch.Tensor]:
        m = self._model
        out = {f"unet.{k}": v.detach() for k, v in m.model.diffusion_model.named_parameters()}
        out.update({f"text.{k}": v.detach() for k, v in self._wrapper.named_parameters()})
        out.update({f"vae.{k}": v.detach() for k, v in m.first_stage_model.named_parameters()})
        return out


__all__ = ["A1111Host"]
