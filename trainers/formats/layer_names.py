"""Names of LoRA layers: a host's parameter names -> one canonical name per module -> kohya keys,
and kohya keys back to canonical names.

A host declares how it spells its parameters (``seam.ParameterNaming``: a prefix per part, a UNet
path in diffusers or LDM names, a Hugging Face CLIP path for the text encoders), so its names are
read without this module knowing the host.  The canonical name of a module is its name in the
diffusers host's naming with the UNet path in diffusers names and the text-encoder path with
``text_model.`` (``unet.down_blocks.1.attentions.0.proj_in``,
``text_encoder_2.text_model.encoder.layers.3.mlp.fc1``).

Only the modules every loader maps are LoRA layers: the UNet's Linear/Conv2d layers (no norms) and
the text encoders' ``self_attn.{q,k,v,out}_proj`` and ``mlp.fc1/fc2``.
"""
from __future__ import annotations

import re

from ..families import FAMILIES, family as family_of
from ..seam import DIFFUSERS_NAMING, ParameterNaming
from .unet_names import DEFAULT_LAYOUTS, UNetLayout, is_ldm_path

#: The UNet's Linear / Conv2d modules, by where they sit (diffusers names).  Norms are left out:
#: A1111's LoRA module refuses GroupNorm/LayerNorm targets and fails the whole file.
_UNET_LINEAR_CONV = re.compile(
    r"^(conv_in|conv_out|(time|add)_embedding\.linear_[12]"
    r"|(down|up)_blocks\.\d+\.(down|up)samplers\.0\.conv"
    r"|((down|up)_blocks\.\d+|mid_block)\.resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)"
    r"|((down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.(proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))))$")
_TE_MODULE_RE = re.compile(
    r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.([qkv]|out)_proj|mlp\.fc[12])$")
_TE_TOP = ("encoder", "embeddings", "final_layer_norm")
_PATH_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")

#: kohya's prefix for UNet keys; the text encoders' come from the families table.
UNET_PREFIX = "lora_unet"
KOHYA_PREFIXES = (UNET_PREFIX, *sorted({e.kohya for f in FAMILIES.values() for e in f.encoders}))

#: Families whose UNet keys kohya's sd-scripts write in LDM names (it trains SDXL on its original
#: UNet, ``sdxl_original_unet``); the others get diffusers names.
_LDM_KEYED = frozenset({"sdxl"})


def unet_key_scheme(family: str) -> str:
    """How the UNet keys of a LoRA file for ``family`` are named: "ldm" or "diffusers"."""
    return "ldm" if family in _LDM_KEYED else "diffusers"


def te_path(path: str) -> str:
    """Hugging Face CLIP text-encoder path with the ``text_model.`` level transformers 5 dropped
    from ``CLIPTextModel`` (``CLIPTextModelWithProjection`` still has it)."""
    if path.split(".", 1)[0] in _TE_TOP:
        return "text_model." + path
    return path


def _check_path(path: str) -> str:
    if not isinstance(path, str) or not _PATH_RE.match(path):
        raise ValueError(f"'{path}' is not a module path (dot-separated names of letters, digits "
                         "and '_').")
    return path


def kohya_key(module_path: str, prefix: str) -> str:
    """kohya's name for a module: ``prefix + "_" + path`` with dots as underscores.

    ``prefix`` is ``lora_unet``, ``lora_te`` (SD1/SD2), ``lora_te1`` or ``lora_te2`` (SDXL), with
    or without the ``lora_``.  Text-encoder paths get the ``text_model.`` level back when it is
    missing (transformers 5).  No other conversion happens here: for SDXL pass the LDM path
    (:meth:`UNetLayout.to_ldm`), or use :func:`layer_key`, which does it.

    >>> kohya_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "unet")
    'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q'
    >>> kohya_key("encoder.layers.0.self_attn.q_proj", "te")
    'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
    """
    p = prefix if prefix.startswith("lora_") else f"lora_{prefix}"
    if p not in KOHYA_PREFIXES:
        raise ValueError(f"Unknown kohya prefix '{prefix}'; use {', '.join(KOHYA_PREFIXES)}.")
    path = _check_path(module_path)
    if p != UNET_PREFIX:
        path = te_path(path)
    return f"{p}_{path.replace('.', '_')}"


def _split(name: str, family: str, naming: ParameterNaming) -> tuple[str, str]:
    """(part, path): ``"unet"`` or an encoder key, and the rest of the name after its prefix."""
    if not isinstance(name, str):
        raise ValueError(f"Layer names must be text, got {type(name).__name__}.")
    fam = family_of(family)
    prefixes = {naming.unet_prefix: "unet", **{p: k for k, p in naming.encoder_prefixes.items()}}
    for prefix in sorted(prefixes, key=len, reverse=True):
        if name.startswith(prefix):
            part = prefixes[prefix]
            if part != "unet" and part not in fam.encoder_keys:
                raise ValueError(f"'{name}': a {fam.title} model has no {part} text encoder.")
            return part, name[len(prefix):]
    raise ValueError(f"'{name}': layer names start with one of {', '.join(prefixes)} for a "
                     f"{fam.title} model (e.g. '{naming.unet_prefix}down_blocks.1.attentions.0.proj_in'"
                     " in diffusers names or the LDM equivalent).")


def _module(part: str, path: str, layout: UNetLayout, name: str) -> str:
    """The module path of a LoRA layer in canonical form (UNet: diffusers names; text encoders:
    with ``text_model.``); ``ValueError`` for modules the loaders do not map."""
    _check_path(path)
    if part != "unet":
        path = te_path(path)
        if not _TE_MODULE_RE.match(path):
            raise ValueError(f"'{name}': LoRA loaders map only the text encoder's "
                             "encoder.layers.N.self_attn.{q,k,v,out}_proj and mlp.fc1/fc2.")
        return path
    if is_ldm_path(path):
        path = layout.to_diffusers(path)
    layout.to_ldm(path)  # raises for blocks outside the layout
    if not _UNET_LINEAR_CONV.match(path):
        raise ValueError(f"'{name}': not a Linear/Conv2d of the UNet that LoRA loaders patch "
                         "(attention projections, proj_in/out, ff.net.0.proj, ff.net.2, "
                         "ResNet convs and time_emb_proj, samplers, conv_in/out, time/add "
                         "embeddings).")
    return path


def parse_layer_name(name: str, family: str, layout: UNetLayout | None = None,
                     naming: ParameterNaming | None = None) -> tuple[str, str]:
    """(part, canonical module path) of a layer named as ``naming`` spells the host's parameters
    (default: the diffusers host's).  The UNet path is read in either scheme: the declared one,
    or LDM names under any naming (the schemes share no top-level name, and LDM names are what
    kohya's SDXL files and ComfyUI use)."""
    layout = layout or DEFAULT_LAYOUTS[family_of(family).name]
    naming = naming or DIFFUSERS_NAMING[family]
    part, path = _split(name, family, naming)
    if part == "unet" and naming.unet_scheme == "ldm" and not is_ldm_path(path):
        raise ValueError(f"'{name}': this host names its UNet in LDM names (input_blocks.N…).")
    return part, _module(part, path, layout, name)


def canonical_name(part: str, path: str, family: str) -> str:
    """The canonical layer name of module ``path`` (canonical form) of ``part``."""
    naming = DIFFUSERS_NAMING[family]
    return (naming.unet_prefix if part == "unet" else naming.encoder_prefixes[part]) + path


def normalize_layer_name(name: str, family: str, layout: UNetLayout | None = None,
                         naming: ParameterNaming | None = None) -> str:
    """The canonical name of a LoRA layer: ``unet.<diffusers path>`` or
    ``text_encoder[_2].text_model.encoder.layers.N.<module>``, from a name as ``naming`` spells
    the host's parameters (default: the diffusers host's, ``seam.DIFFUSERS_NAMING``).
    Raises ``ValueError`` for modules the loaders do not map."""
    return canonical_name(*parse_layer_name(name, family, layout, naming), family)


def layer_key(name: str, family: str, layout: UNetLayout | None = None,
              naming: ParameterNaming | None = None) -> str:
    """The kohya key a layer is written under (UNet in :func:`unet_key_scheme`'s names)."""
    layout = layout or DEFAULT_LAYOUTS[family_of(family).name]
    part, path = parse_layer_name(name, family, layout, naming)
    if part != "unet":
        return kohya_key(path, family_of(family).encoder(part).kohya)
    if unet_key_scheme(family) == "ldm":
        path = layout.to_ldm(path)
    return kohya_key(path, UNET_PREFIX)


def _key_parts(family: str) -> dict[str, str]:
    """kohya prefix -> part.  The first encoder is also read under the other family shape's
    spelling (``lora_te1`` in a one-encoder file, ``lora_te`` in an SDXL one), as loaders do."""
    encoders = family_of(family).encoders
    out = {"lora_te": encoders[0].key, "lora_te1": encoders[0].key}
    out.update({e.kohya: e.key for e in encoders})
    out[UNET_PREFIX] = "unet"
    return out


# Compound words of module names, for turning a kohya key back into a dotted path.
_WORDS = sorted({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q",
    "to_k", "to_v", "to_out", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut",
    "time_emb_proj", "time_embedding", "add_embedding", "linear_1", "linear_2", "input_blocks",
    "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
    "out_proj", "layer_norm1", "layer_norm2", "final_layer_norm", "token_embedding",
    "position_embedding", "text_projection",
}, key=lambda w: -w.count("_"))


def dotted_path(underscored: str) -> str:
    """A module path from its kohya spelling (dots turned into underscores)."""
    words, out, i = underscored.split("_"), [], 0
    while i < len(words):
        for w in _WORDS:
            parts = w.split("_")
            if words[i:i + len(parts)] == parts:
                out.append(w)
                i += len(parts)
                break
        else:
            out.append(words[i])
            i += 1
    return ".".join(out)


def name_of_key(base: str, family: str, layout: UNetLayout | None = None) -> str:
    """The canonical layer name of a kohya key (``<base>.lora_down.weight`` without the suffix),
    whichever UNet naming the file uses."""
    layout = layout or DEFAULT_LAYOUTS[family_of(family).name]
    parts = _key_parts(family)
    prefix = next((p for p in sorted(parts, key=len, reverse=True) if base.startswith(p + "_")), None)
    if prefix is None:
        raise ValueError(f"'{base}' has no {'/'.join(KOHYA_PREFIXES)} prefix.")
    part = parts[prefix]
    path = _module(part, dotted_path(base[len(prefix) + 1:]), layout, base)
    return canonical_name(part, path, family)


__all__ = ["UNET_PREFIX", "KOHYA_PREFIXES", "unet_key_scheme", "te_path", "kohya_key", "parse_layer_name",
           "canonical_name", "normalize_layer_name", "layer_key", "dotted_path", "name_of_key"]
