"""Diffusers-layout weights -> one single-file checkpoint in the original (CompVis/SGM) layout,
the file ``CheckpointLoaderSimple`` and AUTOMATIC1111/Forge load (``docs/FORMATS.md``):
``model.diffusion_model.*`` (UNet, LDM names as ``trainers/formats/unet_names`` maps them),
``first_stage_model.*`` (VAE; mid-attention as 1x1 convs) and the text encoder(s): SD1
``cond_stage_model.transformer.text_model.*``; SD2 OpenCLIP ``cond_stage_model.model.*`` (fused
q/k/v ``in_proj``); SDXL ``conditioner.embedders.0.transformer.*`` (CLIP-L) and
``conditioner.embedders.1.model.*`` (OpenCLIP bigG, ``text_projection`` transposed).

The inverse of what diffusers' single-file loader (and ``hosts/diffusers.load_single_file``) reads.
"""
from __future__ import annotations

import re

import torch

from ..trainers.formats.unet_names import UNetLayout


def _vae_key_to_ldm(key: str, n_levels: int) -> str:
    """One diffusers VAE key -> the original name (decoder levels are numbered bottom-up there)."""
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, what = p[0], p[1]
    if what in ("conv_in", "conv_out"):
        return key
    if what == "conv_norm_out":
        return f"{side}.norm_out.{p[2]}"
    if what == "mid_block":
        if p[2] == "resnets":
            return f"{side}.mid.block_{int(p[3]) + 1}." + ".".join(_vae_resnet_rest(p[4:]))
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
        tail = [x for x in p[5:] if x != "0"]
        return f"{side}.mid.attn_1.{names[p[4]]}." + ".".join(tail)
    level = int(p[2]) if side == "encoder" else n_levels - 1 - int(p[2])
    node = "down" if side == "encoder" else "up"
    if p[3] in ("downsamplers", "upsamplers"):
        return f"{side}.{node}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{p[-1]}"
    return f"{side}.{node}.{level}.block.{p[4]}." + ".".join(_vae_resnet_rest(p[5:]))


def _vae_resnet_rest(rest: list[str]) -> list[str]:
    return ["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0], *rest[1:]]


_PARAMETRIZED = re.compile(r"\.parametrizations\.(\w+)\.original$")


def _state(module, prefix: str, replace: dict | None) -> dict:
    """``module.state_dict()`` with the tensors ``replace`` holds under ``prefix + key`` swapped in.
    Parameters under a ``torch.nn.utils.parametrize`` patch (a fine-tune in progress) are read
    under their own names, unpatched."""
    sd = {_PARAMETRIZED.sub(r".\1", k): v for k, v in module.state_dict().items()}
    if not replace:
        return sd
    return {k: replace.get(prefix + k, v) for k, v in sd.items()}


def _clip_state(te, replace: dict | None = None, prefix: str = "") -> dict:
    """The encoder's weights named as in transformers 4 (``text_model.`` prefix), as checkpoints have them."""
    out = {}
    for k, v in _state(te, prefix, replace).items():
        if k.startswith("text_projection"):
            out[k] = v
        else:
            out[k if k.startswith("text_model.") else "text_model." + k] = v
    return out


def _openclip_state(te, prefix: str, replace: dict | None = None, src_prefix: str = "") -> dict:
    """A CLIP text encoder in OpenCLIP's naming (fused q/k/v ``in_proj``, ``ln_final``, ...)."""
    sd = {k.removeprefix("text_model."): v for k, v in _clip_state(te, replace, src_prefix).items()}
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": sd.pop("final_layer_norm.bias")}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    for i in range(te.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{x}_proj.{kind}") for x in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, 0)
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                         ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{b}.{kind}"] = sd.pop(f"{src}{a}.{kind}")
    assert not sd, f"unconverted text encoder keys: {list(sd)}"
    return out


def to_ldm_state_dict(parts: dict, replace: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``parts`` as one single-file checkpoint in the original layout (what A1111 / ComfyUI save):
    ``model.diffusion_model.*``, ``first_stage_model.*`` and ``cond_stage_model.*`` (SD1: OpenAI
    CLIP under ``transformer.``; SD2: OpenCLIP under ``model.``) or SDXL's ``conditioner.embedders.0/1``.

    ``parts``: ``unet``, ``vae``, ``text_encoders`` (modules) and ``family``.  ``replace``: tensors
    to write instead of the modules' own, keyed ``unet.<key>`` / ``text_encoder[_2].<key>`` (a
    fine-tune's weights); the modules are only read."""
    unet, vae, tes = parts["unet"], parts["vae"], parts["text_encoders"]
    layout = UNetLayout.from_config(unet.config)
    out = {"model.diffusion_model." + layout.key_to_ldm(k): v for k, v in _state(unet, "unet.", replace).items()}
    n = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        if ".mid_block.attentions." in k and k.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original attention uses 1x1 convs
        out["first_stage_model." + _vae_key_to_ldm(k, n)] = v
    family = parts["family"]
    if family == "sd1":
        out.update({"cond_stage_model.transformer." + k: v
                    for k, v in _clip_state(tes[0], replace, "text_encoder.").items()})
    elif family == "sd2":
        out.update(_openclip_state(tes[0], "cond_stage_model.model.", replace, "text_encoder."))
    else:
        out.update({"conditioner.embedders.0.transformer." + k: v
                    for k, v in _clip_state(tes[0], replace, "text_encoder.").items()})
        out.update(_openclip_state(tes[1], "conditioner.embedders.1.model.", replace, "text_encoder_2."))
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


__all__ = ["to_ldm_state_dict"]
