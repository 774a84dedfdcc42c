"""What diffusers 0.42's ``load_lora_weights`` does with a kohya file before PEFT injects the
layers, run with its real conversion functions (lora_pipeline.py ``lora_state_dict``,
``load_lora_into_unet`` -> peft.py ``load_lora_adapter``, lora_base.py
``_load_lora_into_text_encoder``)."""
from __future__ import annotations

import re

import torch

from .architectures import Arch


def _peft_modules(peft_sd: dict, model) -> set[str]:
    """The modules a PEFT state dict patches; asserts each exists and that its factors have the
    shapes PEFT's LoRA layer for it has."""
    mods = dict(model.named_modules())
    seen = set()
    for k, t in peft_sd.items():
        m = re.match(r"^(.*)\.lora_([AB])\.weight$", k)
        assert m, k
        mod = mods.get(m.group(1))
        assert mod is not None, f"diffusers finds no module {m.group(1)}"
        w = mod.weight.shape
        if isinstance(mod, torch.nn.Conv2d):
            want = (t.shape[0], w[1], *w[2:]) if m.group(2) == "A" else (w[0], t.shape[1], 1, 1)
        else:
            want = (t.shape[0], w[1]) if m.group(2) == "A" else (w[0], t.shape[1])
        assert tuple(t.shape) == tuple(want), k
        seen.add(m.group(1))
    return seen


def diffusers_load(a: Arch, sd: dict) -> tuple[set[str], dict]:
    """(layer names diffusers patches, as ``unet.<module>`` / ``<component>.<module>``; alphas).
    Raises where diffusers would (keys left over after conversion)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft)

    sd = _maybe_map_sgm_blocks_to_diffusers(dict(sd), a.unet_model.config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(sd)  # raises on leftover keys
    unet_sd = convert_unet_state_dict_to_peft(
        {k[len("unet."):]: v for k, v in converted.items() if k.startswith("unet.")})
    seen = {f"unet.{m}" for m in _peft_modules(unet_sd, a.unet_model)}
    for comp, te in a.te_models.items():
        te_sd = {k[len(comp) + 1:]: v for k, v in converted.items() if k.startswith(comp + ".")}
        te_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd))
        if not hasattr(te, "text_model"):
            te_sd = {k.removeprefix("text_model."): v for k, v in te_sd.items()}
        seen |= {f"{comp}.{m}" for m in _peft_modules(te_sd, te)}
    return seen, alphas
