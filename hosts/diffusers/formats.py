"""The file formats the diffusers host reads and writes, used from this one module: the UNet
layout that names LoRA keys, a kohya LoRA turned into weight changes of this host's modules, and
a single-file checkpoint in the original layout.  The formats themselves live in ``trainers``
(kohya LoRA, atomic writes) and ``hosts/ldm_export`` (the original key names)."""
from __future__ import annotations

from pathlib import Path

import torch

from ...trainers.formats.files import atomic_write_bytes
from ...trainers.formats.kohya_lora import lora_layers, weight_delta
from ...trainers.formats.unet_names import UNetLayout
from ..ldm_export import to_ldm_state_dict


def unet_layout(unet_config) -> UNetLayout:
    """The UNet's block layout (res blocks per level, where attention is), to name its LoRA keys."""
    return UNetLayout.from_config(unet_config)


def lora_weight_deltas(state_dict: dict[str, torch.Tensor], *, family: str, layout,
                       module_names: list[str]) -> dict[str, torch.Tensor]:
    """``{module name: ΔW}`` (fp32, ``alpha / rank · up @ down``, no strength) of a kohya LoRA state
    dict, each layer placed on the module of ``module_names`` it patches.

    The kohya reader does the naming (both UNet namings the loaders accept, every prefix spelling,
    refusal of LoRA variants and of layers that match no module)."""
    tensors = {k: v.detach().cpu() for k, v in state_dict.items()}
    layers = lora_layers(tensors, family=family, layout=layout, module_names=module_names)
    return {name: weight_delta(*layer) for name, layer in layers.items()}


def write_checkpoint(path: Path, parts: dict, replace: dict[str, torch.Tensor], dtype: torch.dtype | None,
                     metadata: dict | None) -> Path:
    """``parts`` (unet, vae, text_encoders, family) with the ``replace`` tensors swapped in, as one
    safetensors file in the original layout, written to a temp name and renamed.  ``dtype``: every
    floating tensor in it, or None to keep each tensor's own."""
    import safetensors.torch

    sd = to_ldm_state_dict(parts, replace)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).cpu().contiguous()
          for k, v in sd.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = safetensors.torch.save(sd, metadata=meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


__all__ = ["unet_layout", "lora_weight_deltas", "write_checkpoint"]
