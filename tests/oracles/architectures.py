"""The real SD1.5, SD2 and SDXL architectures (``hosts/assets/*/config.json``) built on the ``meta``
device: module names and shapes are exact and nothing is allocated."""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

import likeness
from likeness.trainers.families import family as family_of
from likeness.trainers.formats.layer_names import te_path

ASSETS = Path(likeness.__file__).resolve().parent / "hosts" / "assets"


@dataclass
class Arch:
    family: str
    unet_config: dict
    unet_model: object                 # diffusers UNet2DConditionModel on meta
    unet_params: dict                  # diffusers param name -> shape
    modules: dict                      # layer name ("unet.…", "text_encoder….") -> weight shape
    te_models: dict                    # component -> transformers model on meta
    te_params: dict                    # component -> {canonical (text_model.) param: shape}


@functools.lru_cache(maxsize=None)
def arch(family: str) -> Arch:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = ASSETS / family_of(family).config_folder
    cfg = json.loads((root / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    modules = {}
    for n, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            modules[f"unet.{n}"] = tuple(m.weight.shape)
    te_models, te_params = {}, {}
    for comp in (e.component for e in family_of(family).encoders):
        c = json.loads((root / comp / "config.json").read_text())
        cls = CLIPTextModelWithProjection if "WithProjection" in c["architectures"][0] else CLIPTextModel
        with torch.device("meta"):
            te = cls(CLIPTextConfig.from_dict(c))
        te_models[comp] = te
        te_params[comp] = {te_path(k): tuple(v.shape) for k, v in te.state_dict().items()}
        for n, m in te.named_modules():  # native names: transformers 5 drops CLIPTextModel's text_model.
            if isinstance(m, torch.nn.Linear) and re.search(r"(_proj|fc[12])$", n) and "layers." in n:
                modules[f"{comp}.{n}"] = tuple(m.weight.shape)
    params = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    return Arch(family, cfg, unet, params, modules, te_models, te_params)

