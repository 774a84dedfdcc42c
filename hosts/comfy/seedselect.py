"""SeedSelect on ComfyUI's objects: the ``seam.SeedModel`` over MODEL + CONDITIONING + VAE, the
``seam.ImageEncoder`` over CLIP_VISION, and the NOISE object ``SamplerCustomAdvanced`` takes.

Why it looks the way it does:

* **The denoiser is ComfyUI's own.**  ``run`` calls ``CFGGuider.sample`` - the very path
  ``SamplerCustomAdvanced`` takes - with a ``FunctionSampler`` whose ``sample`` runs our function
  instead of a k-diffusion loop.  Inside, the model is loaded, the conditioning is processed for
  the latent's size (SDXL's size embeddings, area/mask conds, ControlNets, model patches), and
  ``KSamplerX0Inpaint(guider)`` is exactly the callable ComfyUI's samplers call every step.  So
  the optimised noise reproduces through ``SamplerCustomAdvanced`` with the same sampler, sigmas
  and cfg, bar floating-point noise.  The noise scaling ComfyUI applies before the first step
  (``sqrt(1 + sigma^2)`` when the schedule starts at sigma_max, else ``sigma``) is applied by the
  trainer (``diff_sampling.initial_latent``), differentiably.
* **Autograd through inference tensors**: the MODEL, VAE and CLIP_VISION are used through patcher
  clones with identity weight/bias wrappers (``patching.add_identity_wrappers``), so every weight
  is copied per forward and the shared modules are never touched; all work runs inside
  ``inference_mode(False)`` with tensors made there.
* ``VAE.decode`` and ``ClipVisionModel.encode_image`` are not differentiable (in-place output
  buffer; 8-bit rounding in ``clip_preprocess``): ``decode`` is the host's differentiable decode
  (``vae.ComfyVAE``), ``embed`` does its own resize/normalise
  (``trainers.image_encoder.clip_pixels``) and runs the vision tower with ComfyUI's CLIP layers
  swapped for an out-of-place forward.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.samplers

from ...trainers import run_state
from ...trainers.image_encoder import CLIP_MEAN, CLIP_STD, clip_pixels
from .detection import check_vae, model_facts
from .patching import add_identity_wrappers, out_of_place_clip_layers
from .vae import ComfyVAE


class OptimizedNoise:
    """ComfyUI's NOISE protocol (``.seed``, ``.generate_noise(latent)``) for a fixed noise tensor;
    feeds ``SamplerCustomAdvanced`` like ``RandomNoise`` does."""

    def __init__(self, noise: torch.Tensor, seed: int = 0):
        self.noise = noise.detach().to("cpu", torch.float32).clone()
        self.seed = int(seed)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        n = self.noise
        if tuple(samples.shape[1:]) != tuple(n.shape[1:]):
            raise ValueError(f"This optimised noise is for latents of shape {tuple(n.shape[1:])} (an image of "
                             f"{n.shape[-1] * 8}x{n.shape[-2] * 8} px), but the latent is {tuple(samples.shape[1:])}. "
                             "Use an Empty Latent Image of the size SeedSelect was run at.")
        if samples.shape[0] != n.shape[0]:
            if samples.shape[0] % n.shape[0]:
                raise ValueError(f"The latent batch is {samples.shape[0]} but the noise holds {n.shape[0]} seed(s); "
                                 "set the Empty Latent Image batch size to a multiple of it.")
            n = n.repeat(samples.shape[0] // n.shape[0], 1, 1, 1)
        return n.to(dtype=samples.dtype).clone()


class FunctionSampler(comfy.samplers.Sampler):
    """A ComfyUI sampler whose ``sample`` hands the step denoiser to ``fn`` (the TrainLoraNode trick:
    ComfyUI's machinery around, our loop inside).  Returns the latent unchanged; ``fn``'s result is
    kept in ``result``."""

    def __init__(self, fn):
        self.fn, self.result = fn, None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image, model_k.noise = latent_image, noise
        extra = dict(extra_args, denoise_mask=None)

        def denoiser(x, sigma):
            return model_k(x, sigma, **extra)

        self.result = self.fn(denoiser)
        return latent_image


class ComfySeedModel:
    """``seam.SeedModel`` over ComfyUI's MODEL, positive/negative CONDITIONING and VAE (SD1.x,
    SD2.x, SDXL).  The inputs are never modified."""

    def __init__(self, model, positive, negative, vae):
        if model is None or vae is None:
            raise ValueError("SeedSelect needs the MODEL and the VAE of the checkpoint.")
        if not positive:
            raise ValueError("SeedSelect needs the positive conditioning (the prompt that names the concept).")
        facts = model_facts(model)
        check_vae(vae, model)
        self._facts = facts
        self.family, self.prediction = facts.family, facts.prediction
        self.device, self.compute_dtype = facts.device, facts.compute_dtype
        self.latent_channels, self.latent_scale = facts.latent_channels, facts.latent_scale
        self.latent_multiple = facts.latent_multiple
        self.positive, self.negative = positive, negative if negative is not None else []
        # what names the model in a run state: the file ComfyUI loaded it from, its LoRA patches
        init = getattr(model, "cached_patcher_init", None)
        self._source = repr(init[1][0]) if init and init[1] else ""
        self._patches = sorted((k, repr([(p[0], p[2]) for p in v])) for k, v in model.patches.items())
        self._model = model.clone()
        add_identity_wrappers(self._model)
        self._codec = ComfyVAE(vae, self._model.model, self.device)

    # -- the protocol ----------------------------------------------------------------------------
    def training_sigmas(self) -> torch.Tensor:
        return self._facts.training_sigmas("cpu")

    def process_latent_out(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> the VAE's own (what a LATENT output holds)."""
        with torch.inference_mode(False):
            return self._model.model.process_latent_out(latents.float().clone())

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self._codec.encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._codec.decode(latents, differentiable=True)

    def identity(self) -> str:
        """The model and the prompts for a run state's fingerprint: the checkpoint file, the family,
        the patches (a LoRA's keys and strengths), and the conditioning tensors themselves."""
        parts = [f"{self.family}|{self.prediction}|{self._source}".encode()]
        parts += [f"{k}={v}".encode() for k, v in self._patches]
        parts += [b for c in (self.positive, self.negative) for b in _conditioning_bytes(c)]
        return run_state.digest(parts)

    def run(self, sigmas, cfg, fn, shape=None):
        guider = comfy.samplers.CFGGuider(self._model)
        guider.set_conds(self.positive, self.negative)
        guider.set_cfg(cfg)
        sampler = FunctionSampler(fn)
        with torch.inference_mode(False):
            latent = torch.zeros(shape)  # empty latent: nothing to add to the noise
            sigmas = sigmas.detach().float().cpu().clone()
            guider.sample(latent.clone(), latent, sampler, sigmas, disable_pbar=True, seed=0)
        return sampler.result


def _conditioning_bytes(conditioning):
    """The tensors and plain options of a CONDITIONING (``[[tensor, {pooled_output, ...}], ...]``);
    objects (ControlNets, hooks) are left out: their repr would differ between two sessions."""
    def data(t):
        return t.detach().float().cpu().contiguous().numpy().tobytes()

    for item in conditioning or []:
        yield data(item[0])
        extra = item[1] if len(item) > 1 and isinstance(item[1], dict) else {}
        for k in sorted(extra):
            v = extra[k]
            if torch.is_tensor(v):
                yield k.encode() + data(v)
            elif isinstance(v, (bool, int, float, str)):
                yield f"{k}={v!r}".encode()


#: what each CLIP_VISION kind is, for messages (``model_type`` in ComfyUI's config)
VISION_KINDS = {"clip_vision_model": "a CLIP vision model (e.g. CLIP-ViT-H-14 or CLIP-ViT-L-14)",
                "dinov2": "a DINOv2 model (e.g. dinov2-large or dinov2-giant)"}


class ComfyClipVision:
    """``seam.ImageEncoder`` over ComfyUI's CLIP_VISION: a CLIP vision model's projected image
    embeds, or a DINOv2 model's class token after the last norm (what ComfyUI's loader also puts in
    ``image_embeds``).  ``kinds`` are the ``model_type``s the caller accepts, ``use`` says what for
    (the first words of the message when the wrong kind or nothing is connected).  ``tower`` names
    the architecture (kind, width, depth, projection, input size) for ``trainers.metrics``'
    same-model check."""

    def __init__(self, clip_vision, use: str = "SeedSelect needs {} for its semantic loss.",
                 kinds: tuple[str, ...] = ("clip_vision_model",)):
        wanted = " or ".join(VISION_KINDS.get(k, k) for k in kinds)
        if clip_vision is None or not hasattr(clip_vision, "model"):
            raise ValueError(use.format(wanted) + " Connect one (Load CLIP Vision).")
        kind = getattr(clip_vision, "model_type", "clip_vision_model")
        if kind not in kinds:
            raise ValueError(f"This CLIP_VISION is a {kind}; " + use.format(wanted))
        self.cv = clip_vision
        self.size = int(getattr(clip_vision, "image_size", 224))
        self.mean = tuple(getattr(clip_vision, "image_mean", CLIP_MEAN))
        self.std = tuple(getattr(clip_vision, "image_std", CLIP_STD))
        c = getattr(clip_vision, "config", {}) or {}
        self.tower = (f"comfy:{kind}:{c.get('hidden_size')}x{c.get('num_hidden_layers')}"
                      f":{c.get('projection_dim')}:{self.size}")
        self.patcher = clip_vision.patcher.clone()
        add_identity_wrappers(self.patcher)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        comfy.model_management.load_models_gpu([self.patcher])
        dev = self.patcher.load_device
        pv = clip_pixels(images.to(dev).float(), self.size, self.mean, self.std)
        with out_of_place_clip_layers():
            out = self.cv.model(pixel_values=pv, intermediate_output=-2)
        return out[2].float().to(images.device)


__all__ = ["ComfySeedModel", "ComfyClipVision", "VISION_KINDS", "OptimizedNoise", "FunctionSampler"]
