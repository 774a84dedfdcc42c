"""LoRA files in kohya's interchange format, which ComfyUI, AUTOMATIC1111/Forge and diffusers load.

One layer of a LoRA is ``(down, up, alpha)``; the weight change it stands for is
``ΔW = (alpha / r) · up @ down`` with ``r = down.shape[0]`` (Hu et al. 2021, "LoRA", eq. 3, with
kohya's ``alpha`` scaling).  A file holds, per layer, ``<key>.lora_down.weight``,
``<key>.lora_up.weight`` and a 0-dim fp32 ``<key>.alpha``, where ``<key>`` is kohya's name for the
module (``networks/lora.py``: ``prefix + "_" + module path with "." → "_"``):

* Linear: ``down [r, in]``, ``up [out, r]``.  Conv2d: ``down [r, in, kh, kw]``,
  ``up [out, r, 1, 1]`` - 4-D, not flattened, as kohya writes them and as the conv LoRA layers
  diffusers/PEFT build hold them (ComfyUI and A1111 accept either).
* Prefixes: ``lora_unet``; ``lora_te`` (SD1/SD2's one text encoder); ``lora_te1``/``lora_te2``
  (SDXL).  Text-encoder paths are Hugging Face CLIP names with ``text_model.`` (transformers 5's
  ``CLIPTextModel`` dropped that level; we put it back, as every loader expects it).
* UNet names - which each loader accepts (shared/reference/algorithms.md §4.6-4.9, checked in
  tests/test_lora_format.py against re-implementations of the loaders and, where a ComfyUI
  checkout exists, against ComfyUI's own code):

  ========================  =================================  =================================
  loader                    diffusers names (down_blocks_…)    LDM/SGM names (input_blocks_…)
  ========================  =================================  =================================
  ComfyUI LoraLoader        yes (via ``unet_to_diffusers``,    yes (every model weight key)
                            any depth, from the model config)
  A1111 Lora extension      yes (``convert_diffusers_name_to_  yes (``lora_unet`` →
                            compvis``: regexes that assume 2   ``diffusion_model`` fallback)
                            res blocks per level, upsampler
                            index right for SD1 only)
  diffusers                 yes                                yes (``_maybe_map_sgm_blocks_to_
                                                               diffusers``; a file mixing both
                                                               styles loses its SGM keys)
  ========================  =================================  =================================

  We write what kohya's sd-scripts write, so kohya's own tools (resize, merge, extract) also read
  our files: SD1/SD2 in diffusers names, SDXL in LDM names (``sdxl_original_unet``).  Module
  paths are given to us in diffusers names (or LDM names, e.g. from a ComfyUI model) and
  converted with a :class:`UNetLayout` (res blocks per level, which up blocks have attention);
  the default is the real model's, tiny test models pass their own.

* Metadata (all strings): ``ss_*`` as kohya's ``train_network.py`` writes them
  (``ss_network_module`` "networks.lora", ``ss_network_dim``/``_alpha``,
  ``ss_base_model_version`` "sd_v1" | "sd_v2" | "sd_v2_v" | "sdxl_base_v1-0", ``ss_v2``, ...),
  ``sshs_model_hash`` = sha256 of the bytes after the safetensors header, which is what A1111
  shows and looks LoRAs up by (``network.NetworkOnDisk``: the metadata value first, else
  ``hashes.addnet_hash_safetensors`` of the file - the same number), and SAI ``modelspec.*``.

Text-encoder modules are limited to the six every loader maps (``self_attn.{q,k,v,out}_proj``,
``mlp.fc1``, ``mlp.fc2``).  A1111 applies LoRA to an OpenCLIP attention (SD2's encoder, SDXL's
second) only when q, k, v and out_proj of that layer are all present; a partial set is refused.

Bundled embeddings (``bundle_emb``, for pivotal tuning): A1111 registers them as embeddings while
the LoRA is active; ComfyUI reads them only when the file is used as an embedding
(``embedding:<file stem>`` with the file in an embeddings folder; it concatenates every bundled
embedding in the file, so bundle one) and its LoraLoader logs "lora key not loaded" for those
keys; diffusers' ``load_lora_weights`` refuses such a file.  Hence opt-in; the separate
embedding file from ``formats.save_embedding`` is the portable form.

Files are written atomically, never over an existing file unless asked, under names that cannot
escape their folder (``formats``); loading reads safetensors only (no pickle).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import safetensors
import safetensors.torch
import torch

from .formats import (
    FAMILY_ENCODERS,
    WIDTH_TO_KEY,
    _check_vectors,
    _cpu_fp32,
    atomic_write_files,
    check_paths_writable,
    safe_path,
    validate_name,
)

FAMILIES = ("sd1", "sd2", "sdxl")

#: diffusers pipeline attribute of each trainable component, per family.
COMPONENTS = {
    "sd1": ("unet", "text_encoder"),
    "sd2": ("unet", "text_encoder"),
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
}

#: kohya key prefix of each component, per family (sd-scripts ``networks/lora.py``).
KOHYA_PREFIX = {
    "sd1": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sd2": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}

#: ComfyUI's internal text-encoder prefixes (``clip_l.transformer.…``), per family.
_COMFY_CLIP = {
    "sd1": {"clip_l": "text_encoder"},
    "sd2": {"clip_h": "text_encoder"},
    "sdxl": {"clip_l": "text_encoder", "clip_g": "text_encoder_2"},
}

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}

#: Metadata keys the caller may give without the ``ss_`` prefix.
SS_KEYS = frozenset({
    "output_name", "training_started_at", "training_finished_at", "steps", "epoch",
    "max_train_steps", "learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler",
    "lr_warmup_steps", "optimizer", "resolution", "num_train_images", "num_reg_images",
    "num_batches_per_epoch", "num_epochs", "batch_size_per_device", "tag_frequency", "datasets",
    "dataset_dirs", "seed", "mixed_precision", "full_fp16", "gradient_checkpointing",
    "gradient_accumulation_steps", "max_grad_norm", "prior_loss_weight", "min_snr_gamma",
    "noise_offset", "clip_skip", "cache_latents", "caption_dropout_rate", "network_dropout",
    "training_comment", "sd_model_name", "sd_model_hash", "new_sd_model_hash", "vae_name",
    "vae_hash", "session_id", "loss_type", "zero_terminal_snr", "max_token_length",
})

#: Keys this module computes from the layers; a caller's value for them is ignored.
_RESERVED = frozenset({
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
    "sshs_model_hash", "sshs_legacy_hash", "modelspec.sai_model_spec", "modelspec.architecture",
    "modelspec.implementation", "format",
})

_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}

_PATH_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_TE_MODULE_RE = re.compile(
    r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.([qkv]|out)_proj|mlp\.fc[12])$")
_TE_TOP = ("encoder", "embeddings", "final_layer_norm")


class LoraLayer(NamedTuple):
    """One layer: ``down [r, in(, kh, kw)]``, ``up [out, r(, 1, 1)]``, ``alpha`` (scale alpha/r)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float


# --------------------------------------------------------------------------------------------
# UNet names: diffusers <-> LDM/SGM
# --------------------------------------------------------------------------------------------

#: ResnetBlock2D children (diffusers) and their names in LDM's ResBlock.
_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "conv_shortcut": "skip_connection"}
_RESNET_TO_DIFFUSERS = {v: k for k, v in _RESNET_TO_LDM.items()}

#: Modules outside the down/mid/up blocks.
_BASIC_TO_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                 "time_embedding.linear_2": "time_embed.2",
                 "add_embedding.linear_1": "label_emb.0.0",
                 "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0",
                 "conv_out": "out.2"}
_BASIC_TO_DIFFUSERS = {v: k for k, v in _BASIC_TO_LDM.items()}

_LDM_TOP = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")

#: The UNet's Linear / Conv2d modules, by where they sit (diffusers names).  Norms are left out:
#: A1111's LoRA module refuses GroupNorm/LayerNorm targets and fails the whole file.
_UNET_LINEAR_CONV = re.compile(
    r"^(conv_in|conv_out|(time|add)_embedding\.linear_[12]"
    r"|(down|up)_blocks\.\d+\.(down|up)samplers\.0\.conv"
    r"|((down|up)_blocks\.\d+|mid_block)\.resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)"
    r"|((down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.(proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))))$")

_D_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")
_D_SAMPLER = re.compile(r"^(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv$")
_D_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")
_L_BLOCK = re.compile(r"^(input|output)_blocks\.(\d+)\.(\d+)(?:\.(.+))?$")
_L_MID = re.compile(r"^middle_block\.(\d+)(?:\.(.+))?$")


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def _resnet_child(rest: str | None, table: Mapping[str, str], path: str) -> str | None:
    if rest is None:
        return None
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    raise ValueError(f"Unknown ResNet module '{rest}' in UNet path '{path}'.")


@dataclass(frozen=True)
class UNetLayout:
    """What the diffusers ↔ LDM block numbering depends on: res blocks per level (down blocks;
    up blocks have one more) and, per up block in diffusers order, whether it has attention
    (in LDM an up block's upsampler is ``output_blocks.N.2`` after an attention, else ``.N.1``).

    SD1/SD2: ``(2, 2, 2, 2)``, ``(False, True, True, True)``; SDXL: ``(2, 2, 2)``,
    ``(True, True, False)``.  ``down_attention`` (per down block; unknown if None) only
    sharpens the check of names.  :meth:`from_config` reads a diffusers UNet config.
    """

    layers_per_block: tuple[int, ...]
    up_attention: tuple[bool, ...]
    down_attention: tuple[bool, ...] | None = None

    def __post_init__(self):
        lpb, up = tuple(self.layers_per_block), tuple(self.up_attention)
        down = None if self.down_attention is None else tuple(self.down_attention)
        if (not lpb or any(int(n) < 1 for n in lpb) or len(up) != len(lpb)
                or (down is not None and len(down) != len(lpb))):
            raise ValueError(f"Bad UNet layout: layers_per_block={lpb}, up_attention={up}, "
                             f"down_attention={down}.")
        object.__setattr__(self, "layers_per_block", tuple(int(n) for n in lpb))
        object.__setattr__(self, "up_attention", tuple(bool(a) for a in up))
        if down is not None:
            object.__setattr__(self, "down_attention", tuple(bool(a) for a in down))

    def _down_attn(self, level: int) -> bool:
        return self.down_attention is None or self.down_attention[level]

    @classmethod
    def from_config(cls, config: Mapping) -> "UNetLayout":
        """From a diffusers ``UNet2DConditionModel`` config (``unet.config``)."""
        cfg = dict(config)
        levels = len(cfg["block_out_channels"])
        lpb = cfg.get("layers_per_block", 2)
        lpb = (lpb,) * levels if isinstance(lpb, int) else tuple(lpb)
        ups, downs = cfg.get("up_block_types") or (), cfg.get("down_block_types") or ()
        if len(ups) != levels or len(downs) != levels:
            raise ValueError(f"UNet config has {levels} levels but block types {downs}, {ups}.")
        return cls(lpb, tuple("CrossAttn" in t for t in ups),
                   tuple("CrossAttn" in t for t in downs))

    @property
    def _up_layers(self) -> tuple[int, ...]:
        return tuple(reversed(self.layers_per_block))

    def _input_start(self, level: int) -> int:
        return 1 + sum(n + 1 for n in self.layers_per_block[:level])

    def _output_start(self, level: int) -> int:
        return sum(n + 1 for n in self._up_layers[:level])

    def to_ldm(self, path: str) -> str:
        """A diffusers UNet module path as LDM/SGM names it (``down_blocks.1.attentions.0.proj_in``
        → ``input_blocks.4.1.proj_in`` for SDXL).  Raises ``ValueError`` for paths outside the
        layout or unknown to it."""
        levels = len(self.layers_per_block)
        if path in _BASIC_TO_LDM:
            return _BASIC_TO_LDM[path]
        if m := _D_BLOCK.match(path):
            side, kind, rest = m.group(1), m.group(3), m.group(5)
            b, j = int(m.group(2)), int(m.group(4))
            if b >= levels:
                raise ValueError(f"'{path}': the UNet has {levels} levels (see UNetLayout).")
            n_max = self.layers_per_block[b] if side == "down" else self._up_layers[b] + 1
            if j >= n_max:
                raise ValueError(f"'{path}': {side} block {b} has {n_max} {kind} (see UNetLayout).")
            has_attn = self.up_attention[b] if side == "up" else self._down_attn(b)
            if kind == "attentions" and not has_attn:
                raise ValueError(f"'{path}': {side} block {b} has no attention (see UNetLayout).")
            n = self._input_start(b) + j if side == "down" else self._output_start(b) + j
            block = f"{side.replace('down', 'input').replace('up', 'output')}_blocks.{n}"
            if kind == "attentions":
                return _join(block, "1", rest)
            return _join(block, "0", _resnet_child(rest, _RESNET_TO_LDM, path))
        if m := _D_SAMPLER.match(path):
            side, b = m.group(1), int(m.group(2))
            if b >= levels:
                raise ValueError(f"'{path}': the UNet has {levels} levels (see UNetLayout).")
            if side == "down":
                return f"input_blocks.{self._input_start(b) + self.layers_per_block[b]}.0.op"
            n = self._output_start(b) + self._up_layers[b]
            return f"output_blocks.{n}.{2 if self.up_attention[b] else 1}.conv"
        if m := _D_MID.match(path):
            kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "attentions" and i == 0:
                return _join("middle_block.1", rest)
            if kind == "resnets" and i in (0, 1):
                return _join(f"middle_block.{2 * i}", _resnet_child(rest, _RESNET_TO_LDM, path))
        raise ValueError(f"'{path}' is not a module of a diffusers UNet2DConditionModel that "
                         "LoRA loaders map (expected down_blocks.*, mid_block.*, up_blocks.*, "
                         "conv_in, conv_out, time_embedding.*, add_embedding.*).")

    def to_diffusers(self, path: str) -> str:
        """Inverse of :meth:`to_ldm`."""
        if path in _BASIC_TO_DIFFUSERS:
            return _BASIC_TO_DIFFUSERS[path]
        if m := _L_BLOCK.match(path):
            side, n, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            counts = (self.layers_per_block if side == "input"
                      else tuple(k + 1 for k in self._up_layers))
            start = self._input_start if side == "input" else self._output_start
            for b, count in enumerate(counts):
                j = n - start(b)
                if side == "input":
                    if not 0 <= j <= count:
                        continue
                    if j == count:  # the level's downsampler
                        if sub == 0 and rest == "op":
                            return f"down_blocks.{b}.downsamplers.0.conv"
                        break
                    if sub == 1 and self._down_attn(b):
                        return _join(f"down_blocks.{b}.attentions.{j}", rest)
                    if sub == 0:
                        return _join(f"down_blocks.{b}.resnets.{j}",
                                     _resnet_child(rest, _RESNET_TO_DIFFUSERS, path))
                    break
                if not 0 <= j < count:
                    continue
                attn = self.up_attention[b]
                if sub == 0:
                    return _join(f"up_blocks.{b}.resnets.{j}",
                                 _resnet_child(rest, _RESNET_TO_DIFFUSERS, path))
                if sub == 1 and attn:
                    return _join(f"up_blocks.{b}.attentions.{j}", rest)
                if sub == (2 if attn else 1) and j == count - 1 and rest == "conv":
                    return f"up_blocks.{b}.upsamplers.0.conv"
                break
        elif m := _L_MID.match(path):
            sub, rest = int(m.group(1)), m.group(2)
            if sub == 1:
                return _join("mid_block.attentions.0", rest)
            if sub in (0, 2):
                return _join(f"mid_block.resnets.{sub // 2}",
                             _resnet_child(rest, _RESNET_TO_DIFFUSERS, path))
        raise ValueError(f"'{path}' is not an LDM UNet module this layout has "
                         f"({self}); pass the model's UNetLayout.")


DEFAULT_LAYOUTS = {
    "sd1": UNetLayout((2, 2, 2, 2), (False, True, True, True), (True, True, True, False)),
    "sd2": UNetLayout((2, 2, 2, 2), (False, True, True, True), (True, True, True, False)),
    "sdxl": UNetLayout((2, 2, 2), (True, True, False), (False, True, True)),
}


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family '{family}'; expected one of {', '.join(FAMILIES)}.")
    return family


def _te_path(path: str) -> str:
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
    (:meth:`UNetLayout.to_ldm`), or use :func:`lora_state_dict`, which does it.

    >>> kohya_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "unet")
    'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q'
    >>> kohya_key("encoder.layers.0.self_attn.q_proj", "te")
    'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
    """
    p = prefix if prefix.startswith("lora_") else f"lora_{prefix}"
    if p not in ("lora_unet", "lora_te", "lora_te1", "lora_te2"):
        raise ValueError(f"Unknown kohya prefix '{prefix}'; use lora_unet, lora_te, lora_te1 "
                         "or lora_te2.")
    path = _check_path(module_path)
    if p != "lora_unet":
        path = _te_path(path)
    return f"{p}_{path.replace('.', '_')}"


def normalize_layer_name(name: str, family: str, layout: UNetLayout | None = None) -> str:
    """The canonical name of a LoRA layer: ``unet.<diffusers path>`` or
    ``text_encoder[_2].text_model.encoder.layers.N.<module>``.

    Accepted spellings: ``unet.`` + a diffusers or LDM path; ``text_encoder.`` /
    ``text_encoder_2.`` + a CLIP path with or without ``text_model.``; ComfyUI's internal
    ``diffusion_model.<LDM path>`` and ``clip_l|clip_h|clip_g.transformer.<CLIP path>``.
    Raises ``ValueError`` for modules the loaders do not map.
    """
    _check_family(family)
    layout = layout or DEFAULT_LAYOUTS[family]
    if not isinstance(name, str):
        raise ValueError(f"Layer names must be text, got {type(name).__name__}.")
    comp, _, path = name.partition(".")
    if comp == "diffusion_model":
        comp = "unet"
    elif comp in ("clip_l", "clip_g", "clip_h") and path.startswith("transformer."):
        if comp not in _COMFY_CLIP[family]:
            raise ValueError(f"'{name}': a {family} model has no {comp} text encoder.")
        comp, path = _COMFY_CLIP[family][comp], path[len("transformer."):]
    if comp not in COMPONENTS[family]:
        raise ValueError(f"'{name}': layer names start with one of "
                         f"{', '.join(c + '.' for c in COMPONENTS[family])} for a {family} model "
                         "(e.g. 'unet.down_blocks.1.attentions.0.proj_in').")
    _check_path(path)
    if comp == "unet":
        if path.split(".", 1)[0] in _LDM_TOP:
            path = layout.to_diffusers(path)
        layout.to_ldm(path)  # raises for blocks outside the layout
        if not _UNET_LINEAR_CONV.match(path):
            raise ValueError(f"'{name}': not a Linear/Conv2d of the UNet that LoRA loaders patch "
                             "(attention projections, proj_in/out, ff.net.0.proj, ff.net.2, "
                             "ResNet convs and time_emb_proj, samplers, conv_in/out, time/add "
                             "embeddings).")
        return f"unet.{path}"
    path = _te_path(path)
    if not _TE_MODULE_RE.match(path):
        raise ValueError(f"'{name}': LoRA loaders map only the text encoder's "
                         "encoder.layers.N.self_attn.{q,k,v,out}_proj and mlp.fc1/fc2.")
    return f"{comp}.{path}"


def layer_key(name: str, family: str, layout: UNetLayout | None = None) -> str:
    """The kohya key a layer is written under (SD1/SD2 UNet: diffusers names; SDXL: LDM)."""
    canonical = normalize_layer_name(name, family, layout)
    comp, _, path = canonical.partition(".")
    if comp == "unet" and family == "sdxl":
        path = (layout or DEFAULT_LAYOUTS[family]).to_ldm(path)
    return kohya_key(path, KOHYA_PREFIX[family][comp])


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


def _dotted(underscored: str) -> str:
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


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------

def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"Unknown dtype '{dtype}'; use fp16, bf16 or fp32.")
        return _DTYPES[dtype.lower()]
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"LoRA files are fp16, bf16 or fp32, not {dtype}.")
    return dtype


def _check_layer(name: str, value) -> LoraLayer:
    try:
        down, up, alpha = value
    except (TypeError, ValueError):
        raise ValueError(f"'{name}': a layer is (down, up, alpha).") from None
    if not isinstance(down, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise ValueError(f"'{name}': down and up must be tensors.")
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise ValueError(f"'{name}': down/up must be [r, in] and [out, r] (Linear) or "
                         f"[r, in, kh, kw] and [out, r, 1, 1] (Conv2d), got "
                         f"{tuple(down.shape)} and {tuple(up.shape)}.")
    r = down.shape[0]
    if r < 1 or up.shape[1] != r or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise ValueError(f"'{name}': rank mismatch or bad up shape: down {tuple(down.shape)}, "
                         f"up {tuple(up.shape)} (up must be [out, {r}] or [out, {r}, 1, 1]).")
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"'{name}': alpha must be one number.")
        alpha = alpha.item()
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"'{name}': alpha must be a number, got {alpha!r}.") from None
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"'{name}': alpha must be a positive number, got {alpha}.")
    return LoraLayer(down, up, alpha)


def _to_file(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    with torch.inference_mode(False):
        out = t.detach().to("cpu", dtype).contiguous().clone()
    if not torch.isfinite(out).all():
        raise ValueError(f"{what} is not finite in {str(dtype).replace('torch.', '')} "
                         "(NaN, infinity, or too large for fp16); not saving it.")
    return out


def _check_openclip_attention(keys: Iterable[str], family: str) -> None:
    """A1111 patches an OpenCLIP ``nn.MultiheadAttention`` (SD2's encoder, SDXL's second) only
    when the layer's q, k, v and out_proj LoRAs are all present
    (``networks.network_apply_weights``); with a partial set it silently drops them."""
    te = {"sd2": "text_encoder", "sdxl": "text_encoder_2"}.get(family)
    if te is None:
        return
    seen: dict[str, set[str]] = {}
    for k in keys:
        m = re.match(rf"^{te}\.text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv]|out)_proj$", k)
        if m:
            seen.setdefault(m.group(1), set()).add(m.group(2))
    bad = sorted((int(i) for i, s in seen.items() if s != {"q", "k", "v", "out"}))
    if bad:
        raise ValueError(f"{te} layer(s) {bad}: AUTOMATIC1111 applies a LoRA to this encoder's "
                         "attention only with q_proj, k_proj, v_proj and out_proj together; "
                         "train all four or none.")


def lora_state_dict(layers: Mapping[str, object], *, family: str, dtype=torch.float16,
                    layout: UNetLayout | None = None) -> dict[str, torch.Tensor]:
    """The kohya tensors for ``layers`` (name → ``(down, up, alpha)``; names as
    :func:`normalize_layer_name` accepts).  Factors are cast to ``dtype``; ``alpha`` is stored as
    an fp32 scalar (loaders read it with ``.item()``; fp16 would round alphas such as 0.3)."""
    _check_family(family)
    dtype = _as_dtype(dtype)
    if not layers:
        raise ValueError("No LoRA layers to save.")
    out: dict[str, torch.Tensor] = {}
    canon: dict[str, str] = {}
    for name, value in layers.items():
        c = normalize_layer_name(name, family, layout)
        if c in canon:
            raise ValueError(f"'{name}' and '{canon[c]}' are the same module.")
        canon[c] = name
        layer = _check_layer(name, value)
        key = layer_key(c, family, layout)
        out[f"{key}.lora_down.weight"] = _to_file(layer.down, dtype, f"'{name}' down")
        out[f"{key}.lora_up.weight"] = _to_file(layer.up, dtype, f"'{name}' up")
        out[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    _check_openclip_attention(canon, family)
    return out


def weight_delta(down: torch.Tensor, up: torch.Tensor, alpha: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``ΔW = (alpha / r) · up @ down``, shaped like the module's weight: ``[out, in]`` or
    ``[out, in, kh, kw]`` (the conv factors are flattened, multiplied and reshaped, as ComfyUI's
    ``LoRAAdapter.calculate_weight`` and A1111's ``rebuild_conventional`` do)."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.item()
    r = down.shape[0]
    delta = up.reshape(up.shape[0], -1).to(dtype) @ down.reshape(r, -1).to(dtype)
    return (delta * (float(alpha) / r)).reshape(up.shape[0], *down.shape[1:])


def lora_state_dict_to_weight_delta(layers: Mapping[str, object],
                                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """ΔW per layer, from either a layers dict (name → ``(down, up, alpha)``, as
    :func:`load_lora` returns) or a raw kohya state dict (``<key>.lora_down.weight`` …; keyed by
    ``<key>``; a missing alpha means scale 1, as every loader treats it)."""
    if all(isinstance(v, torch.Tensor) for v in layers.values()):
        out = {}
        for k, down in layers.items():
            if k.endswith(".lora_down.weight"):
                base = k[: -len(".lora_down.weight")]
                alpha = layers.get(f"{base}.alpha")
                alpha = down.shape[0] if alpha is None else alpha.item()
                out[base] = weight_delta(down, layers[f"{base}.lora_up.weight"], alpha, dtype)
        return out
    return {k: weight_delta(*_check_layer(k, v), dtype=dtype) for k, v in layers.items()}


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------

def _meta_str(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _resolution(value) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def lora_metadata(layers: Mapping[str, LoraLayer], name: str, family: str, *,
                  prediction: str = "eps",
                  extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """kohya ``ss_*`` + SAI ``modelspec.*`` + ``likeness.*`` metadata (all values str).

    ``extra``: ``ss_*`` and ``modelspec.*`` keys are kept, the short forms in :data:`SS_KEYS`
    (``steps``, ``learning_rate``, ``tag_frequency``, ...) get the ``ss_`` prefix, anything else
    becomes ``likeness.<key>``; dicts and lists are written as JSON, ``None`` is dropped.  The
    keys in ``_RESERVED`` are computed here from the layers and cannot be overridden.
    """
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction is 'eps' or 'v', not {prediction!r}.")
    now = datetime.now(timezone.utc)
    ranks = {int(l.down.shape[0]) for l in layers.values()}
    alphas = {float(l.alpha) for l in layers.values()}
    meta: dict[str, str] = {
        "ss_output_name": name,
        "ss_training_started_at": str(time.time()),
        "ss_network_args": "{}",
    }
    modelspec_extra: dict[str, str] = {}
    res = None
    for k, v in (extra or {}).items():
        if v is None or k in _RESERVED:
            continue
        if k in ("resolution", "ss_resolution"):
            res = _resolution(v) or res
            if res is not None:
                v = str(res)  # kohya writes the tuple: "(512, 512)"
        if k.startswith("modelspec."):
            modelspec_extra[k] = _meta_str(v)
        elif k.startswith(("ss_", "likeness.")):
            meta[k] = _meta_str(v)
        elif k in SS_KEYS:
            meta[f"ss_{k}"] = _meta_str(v)
        else:
            meta[f"likeness.{k}"] = _meta_str(v)
    v2 = family == "sd2"
    version = BASE_MODEL_VERSION[family] + ("_v" if v2 and prediction == "v" else "")
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_base_model_version": version,
        "ss_v2": str(v2),
    })
    # SAI model spec (kohya sd-scripts library/sai_model_spec.py): implementation "diffusers" for
    # SD1/SD2 LoRAs (diffusers module names), the SGM repository for SDXL (its names).
    if family == "sdxl":
        arch, reso = "stable-diffusion-xl-v1-base", "1024x1024"
        impl = "https://github.com/Stability-AI/generative-models"
    elif family == "sd2":
        arch = "stable-diffusion-v2-768-v" if prediction == "v" else "stable-diffusion-v2-512"
        reso, impl = ("768x768" if prediction == "v" else "512x512"), "diffusers"
    else:
        arch, reso, impl = "stable-diffusion-v1", "512x512", "diffusers"
    if res is not None:
        reso = f"{res[0]}x{res[1]}"
    spec = {"modelspec.title": name, "modelspec.date": now.isoformat(timespec="seconds"),
            "modelspec.resolution": reso,
            "modelspec.prediction_type": "v" if prediction == "v" else "epsilon"}
    spec.update(modelspec_extra)
    spec.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{arch}/lora",
                 "modelspec.implementation": impl})
    meta.update(spec)
    meta.update({"format": "pt", "likeness.family": family, "likeness.layers": str(len(layers))})
    return meta


def addnet_hash(data: bytes) -> str:
    """sha256 of a safetensors file's bytes after its header: kohya's ``sshs_model_hash`` and
    A1111's ``hashes.addnet_hash_safetensors`` (what A1111 shows and matches LoRAs by)."""
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + n:]).hexdigest()


_HASH_PLACEHOLDER = "0" * 64


def _with_model_hash(tensors: Mapping[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """Serialize with ``sshs_model_hash`` in the header.  The data section does not depend on the
    header, so the file is written once with a placeholder of the hash's length, which is then
    replaced in place (the header's length and the data offsets do not change)."""
    meta = {**meta, "sshs_model_hash": _HASH_PLACEHOLDER}
    data = bytearray(safetensors.torch.save(dict(tensors), metadata=meta))
    n = int.from_bytes(data[:8], "little")
    field = f'"sshs_model_hash":"{_HASH_PLACEHOLDER}"'.encode()
    at = data.find(field, 8, 8 + n)
    if at < 0 or data.find(field, at + 1, 8 + n) >= 0:  # not the compact JSON we expect
        meta["sshs_model_hash"] = addnet_hash(bytes(data))
        return safetensors.torch.save(dict(tensors), metadata=meta)
    digest = addnet_hash(bytes(data)).encode()
    start = at + len(field) - 65
    data[start:start + 64] = digest
    return bytes(data)


# --------------------------------------------------------------------------------------------
# Bundled embeddings
# --------------------------------------------------------------------------------------------

def _bundle_tensors(bundle: Mapping[str, object], family: str,
                    widths: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """``bundle_emb.<name>.string_to_param.*`` (SD1/SD2) or ``bundle_emb.<name>.clip_l|clip_g``
    (SDXL): the layouts A1111's ``networks.load_network`` and ComfyUI's ``load_embed`` read."""
    out: dict[str, torch.Tensor] = {}
    keys = [k for k, _ in FAMILY_ENCODERS[family]]
    for emb_name, value in bundle.items():
        emb_name = validate_name(emb_name)
        if "." in emb_name:
            raise ValueError(f"Bundled embedding name '{emb_name}' contains '.'; A1111 splits "
                             "the key there. Use '_' or '-'.")
        vectors = dict(value) if isinstance(value, Mapping) else (
            {keys[0]: value} if len(keys) == 1 else {})
        if widths is None:
            _check_vectors(vectors, family)
        else:
            _check_vectors(vectors, family, widths)
        if family == "sdxl":
            for k in keys:
                out[f"bundle_emb.{emb_name}.{k}"] = _cpu_fp32(vectors[k])
        else:
            out[f"bundle_emb.{emb_name}.string_to_param.*"] = _cpu_fp32(vectors[keys[0]])
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def lora_path(folder: str | os.PathLike, name: str) -> Path:
    """``folder/<name>.safetensors``; the name is checked (``formats.validate_name``) and cannot
    leave the folder."""
    return safe_path(folder, validate_name(name) + ".safetensors")


def check_can_write_lora(folder: str | os.PathLike, name: str, overwrite: bool = False) -> Path:
    """Fail early, before training, if the LoRA file could not be written; returns its path."""
    path = lora_path(folder, name)
    check_paths_writable(folder, [path], overwrite)
    return path


def save_lora(folder: str | os.PathLike, name: str, layers: Mapping[str, object], *, family: str,
              metadata: Mapping[str, object] | None = None, dtype=torch.float16,
              prediction: str = "eps", layout: UNetLayout | None = None,
              bundle_emb: Mapping[str, object] | None = None,
              bundle_widths: Mapping[str, int] | None = None, overwrite: bool = False) -> Path:
    """Write ``folder/<name>.safetensors`` in kohya's format (module docstring) and return it.

    ``layers``: layer name (:func:`normalize_layer_name`) → ``(down, up, alpha)``.
    ``dtype``: of the factors, fp16 (kohya's default), bf16 or fp32.  ``prediction``: the base
    model's ("eps" or "v"; SD2-768 is "v").  ``layout``: the UNet's (default: the real model's).
    ``bundle_emb``: name → vectors (``{"clip_l": [n,768], "clip_g": [n,1280]}`` for SDXL, a
    ``[n, width]`` tensor or ``{"clip_l"|"clip_h": T}`` for SD1/SD2); see the module docstring for
    which loaders read it; ``bundle_widths`` ({encoder key: width}) replaces the real encoders'
    widths (tiny test models).  Every check runs before anything is written.
    """
    _check_family(family)
    path = check_can_write_lora(folder, name, overwrite)
    name = path.stem
    tensors = lora_state_dict(layers, family=family, dtype=dtype, layout=layout)
    checked = {k: _check_layer(k, v) for k, v in layers.items()}
    if bundle_emb:
        tensors.update(_bundle_tensors(bundle_emb, family, bundle_widths))
    meta = lora_metadata(checked, name, family, prediction=prediction, extra=metadata)
    data = _with_model_hash(tensors, meta)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return atomic_write_files({path: data})[0]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: LoRA files are read from .safetensors only (a .pt/.ckpt "
                         "could run code when unpickled).")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path.name} is not a readable safetensors file: {e}") from e


def _family_of(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> str:
    version = meta.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2") or meta.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    if meta.get("likeness.family") in FAMILIES:
        return meta["likeness.family"]
    if any(k.startswith("lora_te2_") for k in tensors):
        return "sdxl"
    return "sd1"


def load_lora(path: str | os.PathLike, *, family: str | None = None,
              layout: UNetLayout | None = None,
              module_names: Iterable[str] | None = None,
              ) -> tuple[dict[str, LoraLayer], dict[str, str]]:
    """Read a kohya-format LoRA: ``({layer name: LoraLayer}, metadata)``.

    Names are canonical (:func:`normalize_layer_name`: ``unet.<diffusers path>``,
    ``text_encoder[_2].text_model.…``) whichever UNet naming the file uses, or, with
    ``module_names`` (e.g. ``"unet." + n for n, _ in unet.named_modules()`` and the text
    encoders'), the caller's own spelling of each module.  Factors keep the file's dtype; a
    missing alpha reads as the rank (scale 1, as every loader treats it).  ``family`` defaults to
    what the metadata says.  Bundled embeddings are skipped (:func:`load_bundled_embeddings`);
    other LoRA variants (DoRA, LoCon mid, LoHa, ...) are refused.
    """
    path = Path(path)
    tensors, meta = _read(path)
    family = _check_family(family or _family_of(tensors, meta))
    layout = layout or DEFAULT_LAYOUTS[family]
    prefixes = {v: k for k, v in KOHYA_PREFIX[family].items()}
    if family == "sdxl":
        prefixes["lora_te"] = "text_encoder"
    else:
        prefixes["lora_te1"] = "text_encoder"
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("bundle_emb."):
            continue
        base, _, part = key.partition(".")
        if part not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise ValueError(f"{path.name}: '{key}' is not a plain LoRA tensor (DoRA, LoCon, LoHa "
                             "and other variants are not supported).")
        groups.setdefault(base, {})[part] = t
    own = None
    if module_names is not None:
        own = {}
        for n in module_names:
            try:
                own.setdefault(normalize_layer_name(n, family, layout), n)
            except ValueError:
                continue
    layers: dict[str, LoraLayer] = {}
    unknown = []
    for base, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{path.name}: '{base}' lacks lora_down or lora_up.")
        prefix = next((p for p in sorted(prefixes, key=len, reverse=True)
                       if base.startswith(p + "_")), None)
        if prefix is None:
            raise ValueError(f"{path.name}: '{base}' has no lora_unet/lora_te prefix.")
        comp = prefixes[prefix]
        try:
            name = normalize_layer_name(f"{comp}.{_dotted(base[len(prefix) + 1:])}", family, layout)
        except ValueError as e:
            raise ValueError(f"{path.name}: cannot place '{base}' in a {family} model: "
                             f"{e}") from None
        if own is not None:
            if name not in own:
                unknown.append(name)
                continue
            name = own[name]
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = parts.get("alpha")
        layers[name] = _check_layer(base, (down, up, down.shape[0] if alpha is None else alpha))
    if unknown:
        raise ValueError(f"{path.name}: {len(unknown)} layer(s) match no given module, e.g. "
                         f"{unknown[:3]}.")
    return layers, meta


def load_bundled_embeddings(path: str | os.PathLike,
                            family: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Embeddings bundled in a LoRA, name → encoder-keyed fp32 vectors (``{"clip_l": T}``,
    ``{"clip_h": T}`` or ``{"clip_l": T, "clip_g": T}``).  An SD1/SD2 ``string_to_param`` vector
    is keyed by its width (768 clip_l, 1024 clip_h), or by ``family``'s encoder when given."""
    if family is not None:
        _check_family(family)
    tensors, _ = _read(Path(path))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith("bundle_emb."):
            continue
        emb_name, _, rest = key[len("bundle_emb."):].partition(".")
        if rest.startswith("string_to_param."):
            enc = FAMILY_ENCODERS[family][0][0] if family else WIDTH_TO_KEY.get(t.shape[-1])
            if enc is None:
                raise ValueError(f"'{key}': width {t.shape[-1]} matches no text encoder.")
        elif rest in ("clip_l", "clip_g", "clip_h"):
            enc = rest
        else:
            raise ValueError(f"'{key}' is not a bundled-embedding key.")
        out.setdefault(emb_name, {})[enc] = _cpu_fp32(t.reshape(-1, t.shape[-1]))
    return out
