"""Single-file checkpoints (the original CompVis / SGM layout that A1111 and ComfyUI load), read
offline: which family and prediction a file holds, and its tensors converted into diffusers
modules built from the shipped configs.  Pickles are never executed (``weights_only=True``).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from ...trainers.families import family as family_spec
from .folder import config_folder, folder_scheduler, folder_tokenizer, prediction_from_scheduler


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
    folder = Path(config_dir) if config_dir else config_folder(family)
    unet = _assign_converted(UNet2DConditionModel, folder / "unet", sd, convert_ldm_unet_checkpoint, path)
    vae = _assign_converted(AutoencoderKL, folder / "vae", sd, convert_ldm_vae_checkpoint, path)
    tes = _text_encoders_from_ldm(sd, folder, family, path)
    # diffusers names each encoder's tokenizer after it: text_encoder_2 -> tokenizer_2
    toks = [folder_tokenizer(folder / e.component.replace("text_encoder", "tokenizer"))
            for e in family_spec(family).encoders]
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


def _assign_converted(cls, folder: Path, sd: dict, convert, path: Path):
    """Build a diffusers model on the meta device and assign the converted checkpoint tensors."""
    config = cls.load_config(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = cls.from_config(config)
    weights = {k: v.contiguous() for k, v in convert(checkpoint=sd, config=config).items() if v is not None}
    return _assign(model, weights, folder.name, path)


#: where each encoder's weights sit in a single file: OpenAI CLIP in the transformers layout (the
#: converter finds it), OpenCLIP under a prefix; and whether it carries a projection (SDXL's bigG)
_LDM_TEXT = {"clip_l": (None, False), "clip_h": ("cond_stage_model.model.", False),
             "clip_g": ("conditioner.embedders.1.model.", True)}


def _text_encoders_from_ldm(sd: dict, folder: Path, family: str, path: Path) -> list:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = []
    for enc in family_spec(family).encoders:  # in file order
        prefix, projection = _LDM_TEXT[enc.key]
        config = CLIPTextConfig.from_pretrained(str(folder / enc.component), local_files_only=True)
        with torch.device("meta"):
            model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
        converted = (convert_ldm_clip_checkpoint(sd) if prefix is None
                     else convert_open_clip_checkpoint(model, sd, prefix=prefix))
        out.append(_assign(model, _fit_text_model_prefix(converted, model), enc.component, path))
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


__all__ = ["read_checkpoint", "detect_family", "load_single_file"]
