"""What a ComfyUI MODEL / CLIP / VAE is, judged from ComfyUI's own classes: the family (from
``trainers/families.py``), the prediction type, the checkpoint's name and the UNet's layout, and
whether a CLIP and a VAE belong to the MODEL.

Detection goes by ComfyUI's model classes, not by state-dict keys: the loader already decided what
the file is, and a patched MODEL (LoRA, model-sampling patch) is judged as the sampler will see it.
An unsupported model is refused with a message that says what it is and what Likeness supports.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_sampling
import comfy.sd1_clip
import comfy.supported_models

from ...trainers.families import FAMILIES, SUPPORTED
from ...trainers.formats.unet_names import UNetLayout, unet_layout_of  # noqa: F401  (re-exported)


def _what(model) -> str:
    base = getattr(model, "model", None)
    cfg = getattr(base, "model_config", None)
    return type(base).__name__ + (f" ({type(cfg).__name__})" if cfg is not None else "")


def family_of(model) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` for a MODEL (ModelPatcher) of a supported checkpoint;
    ValueError naming what it is otherwise.  Exact classes: a subclass (an inpainting or refiner
    model) conditions differently."""
    base = getattr(model, "model", None)
    cfg = getattr(base, "model_config", None)
    if type(base) is comfy.model_base.SDXL and isinstance(cfg, comfy.supported_models.SDXL):
        family = "sdxl"
    elif type(base) is comfy.model_base.BaseModel and isinstance(cfg, comfy.supported_models.SD20):
        family = "sd2"
    elif type(base) is comfy.model_base.BaseModel and isinstance(cfg, comfy.supported_models.SD15):
        family = "sd1"
    else:
        raise ValueError(f"{SUPPORTED}; this MODEL is {_what(model)}.")
    latent_format = comfy.latent_formats.SDXL if family == "sdxl" else comfy.latent_formats.SD15
    if type(base.latent_format) is not latent_format:
        raise ValueError(f"{SUPPORTED}; this MODEL ({_what(model)}) uses the latent format "
                         f"{type(base.latent_format).__name__}, which Likeness does not know.")
    return family


def prediction_of(model_sampling, what: str) -> str:
    """``"eps"`` or ``"v"`` for the MODEL's (possibly patched) ``model_sampling``; ValueError for
    continuous schedules and other parameterisations.  ``what`` names the MODEL in messages."""
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


def checkpoint_name(model) -> str:
    """The file CheckpointLoaderSimple loaded the MODEL from, when ComfyUI kept it; else "unknown"."""
    init = getattr(model, "cached_patcher_init", None)
    try:
        path = init[1][0]
        if isinstance(path, str) and path:
            return os.path.basename(path)
    except (TypeError, IndexError):
        pass
    return "unknown"


def check_clip(clip, family: str) -> None:
    """ValueError unless ``clip`` has every text encoder of ``family`` at its width (its key is the
    attribute name in ComfyUI's tokenizer and text-encoder objects)."""
    tok, cse = getattr(clip, "tokenizer", None), getattr(clip, "cond_stage_model", None)
    for e in FAMILIES[family].encoders:
        sub, enc = getattr(tok, e.key, None), getattr(cse, e.key, None)
        if not isinstance(sub, comfy.sd1_clip.SDTokenizer) or not isinstance(enc, comfy.sd1_clip.SDClipModel):
            have = type(cse).__name__ if cse is not None else type(clip).__name__
            raise ValueError(f"This CLIP ({have}) does not belong to the {family.upper()} MODEL: it has no "
                             f"{e.key} text encoder. Connect the CLIP output of the same checkpoint loader.")
        width = enc.transformer.get_input_embeddings().weight.shape[-1]
        if width != sub.embedding_size or width != e.width:
            raise ValueError(f"The {e.key} text encoder is {width} wide but its tokenizer expects "
                             f"{sub.embedding_size} ({FAMILIES[family].title}: {e.width}); this CLIP is not a "
                             f"standard {family.upper()} CLIP.")


def check_vae(vae, model) -> None:
    """ValueError unless ``vae`` makes the latents ``model`` denoises (channels and scale)."""
    lc = getattr(vae, "latent_channels", None)
    fmt = model.model.latent_format
    ratio = getattr(vae, "downscale_ratio", None)
    if lc != fmt.latent_channels or ratio != fmt.spacial_downscale_ratio:
        raise ValueError(f"This VAE makes {lc}-channel latents at 1/{ratio} scale, but the MODEL expects "
                         f"{fmt.latent_channels} channels at 1/{fmt.spacial_downscale_ratio}. Connect the VAE "
                         "of the same checkpoint (or an SD/SDXL VAE).")


@dataclass(frozen=True)
class ModelFacts:
    """What every Likeness object over a ComfyUI MODEL records of it (``model_facts``)."""

    family: str
    prediction: str
    model_sampling: object  # ComfyUI's model_sampling, patches honoured
    device: torch.device
    compute_dtype: torch.dtype
    latent_channels: int
    latent_scale: int  # pixels per latent cell
    latent_multiple: int  # 2 ** the UNet's downsamplings

    def training_sigmas(self, device) -> torch.Tensor:
        """The discrete training sigmas, ascending, fp32 ordinary tensors on ``device``."""
        with torch.inference_mode(False):
            s = self.model_sampling.sigmas.detach().to(device, torch.float32).clone()
        return s.flip(0) if s.numel() > 1 and s[0] > s[-1] else s


def model_facts(model) -> ModelFacts:
    """Detect and describe a MODEL (ValueError for an unsupported one)."""
    family = family_of(model)
    ms = model.get_model_object("model_sampling")
    fmt = model.model.latent_format
    manual = model.get_model_object("manual_cast_dtype")
    mult = (getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}).get("channel_mult")
    return ModelFacts(family=family, prediction=prediction_of(ms, type(model.model).__name__), model_sampling=ms,
                      device=torch.device(model.load_device),
                      compute_dtype=manual if manual is not None else model.model_dtype(),
                      latent_channels=int(fmt.latent_channels), latent_scale=int(fmt.spacial_downscale_ratio),
                      latent_multiple=2 ** (len(mult) - 1 if mult else 3))


__all__ = ["family_of", "prediction_of", "checkpoint_name", "check_clip", "check_vae", "unet_layout_of",
           "ModelFacts", "model_facts", "SUPPORTED"]
