"""LoRA files (``trainers/lora_format.py``): ComfyUI, AUTOMATIC1111 and diffusers load every key of
what we write for the real SD1.5, SD2 and SDXL architectures, and the writer is safe.

The architectures are the real ones (``hosts/assets/*/config.json``) built on the ``meta`` device,
so module names and shapes are exact and nothing is allocated.  The UI loaders' key handling is
re-implemented here from their source (cited per function; written anew, not copied):

* ComfyUI v0.20.1: ``comfy/utils.py`` ``unet_to_diffusers`` (:268-400), ``comfy/lora.py``
  ``model_lora_keys_clip``/``model_lora_keys_unet``/``load_lora`` (:28-205),
  ``comfy/weight_adapter/lora.py`` ``LoRAAdapter.load``/``calculate_weight`` (:150-281).  When a
  ComfyUI checkout is present, the real functions are run on the same files and must agree
  (AST-extracted, no ComfyUI import); ``-m comfyui`` also builds ComfyUI's own models.
* AUTOMATIC1111 v1.10 ``extensions-builtin/Lora``: ``networks.py`` (``convert_diffusers_name_to_
  compvis``, ``assign_network_names_to_compvis_modules``, ``load_network``,
  ``network_apply_weights``), ``network_lora.py`` (module shapes), ``network.py``.  Its model's
  module names come from the original-layout checkpoint keys (algorithms.md §4.10).
* diffusers 0.42: the real conversion functions ``load_lora_weights`` calls.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors
import safetensors.torch
import torch

import likeness
from likeness.trainers import lora_format as lf
from likeness.trainers.lora_format import (
    DEFAULT_LAYOUTS,
    UNetLayout,
    kohya_key,
    layer_key,
    load_bundled_embeddings,
    load_lora,
    lora_state_dict_to_weight_delta,
    normalize_layer_name,
    save_lora,
    weight_delta,
)

ASSETS = Path(likeness.__file__).resolve().parent / "hosts" / "assets"
ASSET_DIR = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}
TE_FILE_KEY = {"sd1": {"text_encoder": "clip_l"}, "sd2": {"text_encoder": "clip_h"},
               "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}


# --------------------------------------------------------------------------------------------
# The real architectures, on the meta device
# --------------------------------------------------------------------------------------------

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

    root = ASSETS / ASSET_DIR[family]
    cfg = json.loads((root / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    modules = {}
    for n, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            modules[f"unet.{n}"] = tuple(m.weight.shape)
    te_models, te_params = {}, {}
    for comp in lf.COMPONENTS[family][1:]:
        c = json.loads((root / comp / "config.json").read_text())
        cls = CLIPTextModelWithProjection if "WithProjection" in c["architectures"][0] else CLIPTextModel
        with torch.device("meta"):
            te = cls(CLIPTextConfig.from_dict(c))
        te_models[comp] = te
        te_params[comp] = {lf._te_path(k): tuple(v.shape) for k, v in te.state_dict().items()}
        for n, m in te.named_modules():  # native names: transformers 5 drops CLIPTextModel's text_model.
            if isinstance(m, torch.nn.Linear) and re.search(r"(_proj|fc[12])$", n) and "layers." in n:
                modules[f"{comp}.{n}"] = tuple(m.weight.shape)
    params = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    return Arch(family, cfg, unet, params, modules, te_models, te_params)


PRESETS = {
    # diffusers' DreamBooth-LoRA targets: attention projections (+ every text-encoder layer)
    "attn": lambda n: bool(re.search(r"\.attn[12]\.to_(q|k|v|out\.0)$", n)) or not n.startswith("unet."),
    # kohya's: every Linear / 1x1 Conv inside the transformer blocks (+ text encoders)
    "kohya": lambda n: ".attentions." in n or not n.startswith("unet."),
    # everything: also the ResNet 3x3 convs, samplers, conv_in/out, time/label embeddings (LoCon)
    "all": lambda n: True,
}


def make_layers(a: Arch, preset: str, rank: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (n, shape) in enumerate(a.modules.items()):
        if not PRESETS[preset](n):
            continue
        if len(shape) == 4:
            down = torch.randn(rank, *shape[1:], generator=g)
            up = torch.randn(shape[0], rank, 1, 1, generator=g)
        else:
            down, up = torch.randn(rank, shape[1], generator=g), torch.randn(shape[0], rank, generator=g)
        out[n] = (down * 0.1, up * 0.1, float(1 + i % 3))
    return out


_FILES: dict = {}
WRITTEN = {"sd1": "all", "sd2": "kohya", "sdxl": "all"}  # the widest preset each family is tested with


def saved(tmp_path_factory, family: str, preset: str = "all"):
    """(path, layers, state dict) for the preset.  One file per family is written (every Linear/
    Conv of the UNet and every text-encoder layer); a preset's state dict is that file's keys
    for the preset's layers - the loaders map each key on its own, so a subset of a file that
    loads fully loads fully too (A1111's OpenCLIP q/k/v/out grouping is kept by every preset)."""
    if family not in _FILES:
        layers = make_layers(arch(family), WRITTEN[family])
        folder = tmp_path_factory.mktemp(f"lora_{family}")
        path = save_lora(folder, f"{family}_{WRITTEN[family]}", layers, family=family)
        _FILES[family] = (path, layers, safetensors.torch.load_file(str(path)))
    path, layers, sd = _FILES[family]
    layers = {n: v for n, v in layers.items() if PRESETS[preset](n)}
    keys = {layer_key(n, family) for n in layers}
    return path, layers, {k: v for k, v in sd.items() if k.partition(".")[0] in keys}


ROWS = 8  # spot checks of ΔW compare its first output rows: (up[:ROWS] @ down) = ΔW[:ROWS]


def sample(names, k: int = 8) -> list:
    """Up to ``k`` names spread over the list."""
    return list(names)[:: max(1, len(names) // k)][:k]


def assert_near(x: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float = 0.0) -> None:
    """max|x - ref| <= atol + rtol * max|ref| (cheaper than assert_close on big tensors)."""
    assert x.shape == ref.shape
    err = (x.double() - ref.double()).abs().max().item()
    assert err <= atol + rtol * ref.abs().max().item(), err


@functools.lru_cache(maxsize=None)
def d2l(family: str) -> dict:
    """ComfyUI's diffusers -> LDM weight-name map for the real model of ``family``."""
    return comfy_unet_to_diffusers(comfy_unet_config(arch(family).unet_config))


def expected_target(a: Arch, name: str) -> tuple[str, str]:
    """(ComfyUI internal weight key, LDM module name) of a layer, from the ComfyUI map below."""
    canon = normalize_layer_name(name, a.family)
    comp, _, path = canon.partition(".")
    if comp == "unet":
        ldm = d2l(a.family)[path + ".weight"][:-len(".weight")]
        return f"diffusion_model.{ldm}.weight", ldm
    return f"{TE_FILE_KEY[a.family][comp]}.transformer.{path}.weight", path


# --------------------------------------------------------------------------------------------
# ComfyUI v0.20.1, re-implemented
# --------------------------------------------------------------------------------------------

# comfy/utils.py:268-334 - weight names inside SpatialTransformer / BasicTransformerBlock / ResBlock,
# and the modules outside the blocks (LDM name, diffusers name).
C_ATTENTION = [f"{m}.{p}" for m in ("norm", "proj_in", "proj_out") for p in ("weight", "bias")]
C_TRANSFORMER = ([f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
                 + [f"attn{a}.to_{x}.weight" for a in (1, 2) for x in ("q", "k", "v")]
                 + [f"attn{a}.to_out.0.{p}" for a in (1, 2) for p in ("weight", "bias")]
                 + [f"ff.net.{x}.{p}" for x in ("0.proj", "2") for p in ("weight", "bias")])
C_RESNET = {f"{ldm}.{p}": f"{d}.{p}" for ldm, d in
            [("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"), ("out_layers.3", "conv2"),
             ("skip_connection", "conv_shortcut"), ("in_layers.0", "norm1"), ("out_layers.0", "norm2")]
            for p in ("weight", "bias")}
C_BASIC = [(f"{ldm}.{p}", f"{d}.{p}") for ldm, d in
           [("label_emb.0.0", "class_embedding.linear_1"), ("label_emb.0.2", "class_embedding.linear_2"),
            ("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2"),
            ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
            ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2")]
           for p in ("weight", "bias")]


def comfy_unet_config(dcfg: dict) -> dict:
    """The unet_config ComfyUI's model detection produces, from a diffusers config."""
    levels, L = len(dcfg["block_out_channels"]), dcfg["layers_per_block"]
    depth = dcfg.get("transformer_layers_per_block") or 1
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    down_attn = ["CrossAttn" in t for t in dcfg["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in dcfg["up_block_types"]]
    up_depth = list(reversed(depth))
    pops = [up_depth[x] if up_attn[x] else 0 for x in range(levels) for _ in range(L + 1)]
    return {"num_res_blocks": [L] * levels, "channel_mult": [1] * levels,
            "transformer_depth": [depth[b] if down_attn[b] else 0 for b in range(levels) for _ in range(L)],
            "transformer_depth_output": list(reversed(pops)),  # ComfyUI pops from the end
            "transformer_depth_middle": depth[-1]}


def comfy_unet_to_diffusers(cfg: dict) -> dict:
    """comfy/utils.py:336-400: diffusers weight name -> LDM weight name."""
    out = {}
    nrb = cfg["num_res_blocks"]
    depth, depth_out = list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])
    levels = len(cfg["channel_mult"])

    def attention(d_prefix, l_prefix, count):
        for w in C_ATTENTION:
            out[f"{d_prefix}.{w}"] = f"{l_prefix}.{w}"
        for t in range(count):
            for w in C_TRANSFORMER:
                out[f"{d_prefix}.transformer_blocks.{t}.{w}"] = f"{l_prefix}.transformer_blocks.{t}.{w}"

    for x in range(levels):
        n = 1 + (nrb[x] + 1) * x
        for i in range(nrb[x]):
            for l_w, d_w in C_RESNET.items():
                out[f"down_blocks.{x}.resnets.{i}.{d_w}"] = f"input_blocks.{n}.0.{l_w}"
            t = depth.pop(0)
            if t > 0:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", t)
            n += 1
        for p in ("weight", "bias"):
            out[f"down_blocks.{x}.downsamplers.0.conv.{p}"] = f"input_blocks.{n}.0.op.{p}"
    attention("mid_block.attentions.0", "middle_block.1", cfg["transformer_depth_middle"])
    for i, n in enumerate((0, 2)):
        for l_w, d_w in C_RESNET.items():
            out[f"mid_block.resnets.{i}.{d_w}"] = f"middle_block.{n}.{l_w}"
    rev = list(reversed(nrb))
    for x in range(levels):
        n, count = (rev[x] + 1) * x, rev[x] + 1
        for i in range(count):
            c = 1
            for l_w, d_w in C_RESNET.items():
                out[f"up_blocks.{x}.resnets.{i}.{d_w}"] = f"output_blocks.{n}.0.{l_w}"
            t = depth_out.pop()
            if t > 0:
                c += 1
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", t)
            if i == count - 1:
                for p in ("weight", "bias"):
                    out[f"up_blocks.{x}.upsamplers.0.conv.{p}"] = f"output_blocks.{n}.{c}.conv.{p}"
            n += 1
    for ldm, d in C_BASIC:
        out[d] = ldm
    return out


# comfy/lora.py:28-35
C_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
              "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
              "self_attn.out_proj": "self_attn_out_proj"}


def comfy_key_map(unet_keys, unet_cfg, clip_keys) -> dict:
    """comfy/lora.py model_lora_keys_clip (:98-176, SD/SDXL part) + model_lora_keys_unet (:179-205)."""
    km = {}
    clip_keys = set(clip_keys)
    for k in clip_keys:
        if k.endswith(".weight"):
            km[f"text_encoders.{k[:-7]}"] = k
    l_present = False
    for b in range(32):
        for c, kc in C_CLIP_MAP.items():
            k = f"clip_h.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in clip_keys:
                km[f"lora_te_text_model_encoder_layers_{b}_{kc}"] = k
                km[f"lora_te1_text_model_encoder_layers_{b}_{kc}"] = k
                km[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in clip_keys:
                km[f"lora_te_text_model_encoder_layers_{b}_{kc}"] = k
                km[f"lora_te1_text_model_encoder_layers_{b}_{kc}"] = k
                l_present = True
                km[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in clip_keys:
                if l_present:
                    km[f"lora_te2_text_model_encoder_layers_{b}_{kc}"] = k
                    km[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = k
                else:
                    km[f"lora_te_text_model_encoder_layers_{b}_{kc}"] = k
                    km[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
                    km[f"lora_prior_te_text_model_encoder_layers_{b}_{kc}"] = k
    if "clip_g.transformer.text_projection.weight" in clip_keys:
        for name in ("lora_prior_te_text_projection", "lora_te2_text_projection"):
            km[name] = "clip_g.transformer.text_projection.weight"
    if "clip_l.transformer.text_projection.weight" in clip_keys:
        km["lora_te1_text_projection"] = "clip_l.transformer.text_projection.weight"
    for k in unet_keys:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                km["lora_unet_" + k[len("diffusion_model."):-7].replace(".", "_")] = k
                km[k[:-7]] = k
            else:
                km[k] = k
    for d, l in comfy_unet_to_diffusers(unet_cfg).items():
        if d.endswith(".weight"):
            target, base = f"diffusion_model.{l}", d[:-7]
            km["lora_unet_" + base.replace(".", "_")] = target
            km["lycoris_" + base.replace(".", "_")] = target
            for p in ("", "unet."):
                dk = p + base.replace(".to_", ".processor.to_")
                km[dk[:-2] if dk.endswith(".to_out.0") else dk] = target
    return km


# comfy/weight_adapter/lora.py:159-196: (up, down, mid) suffixes, first match wins
C_LORA_STYLES = [(".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
                 ("_lora.up.weight", "_lora.down.weight", None), (".lora_B.weight", ".lora_A.weight", None),
                 (".lora.up.weight", ".lora.down.weight", None), (".lora_B", ".lora_A", None),
                 (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
                 (".lora_B.default.weight", ".lora_A.default.weight", None)]


def comfy_load_lora(lora: dict, key_map: dict) -> tuple[dict, list]:
    """comfy/lora.py load_lora (:38-96) with the LoRA adapter: (patches, keys not loaded)."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        if f"{x}.dora_scale" in lora:
            loaded.add(f"{x}.dora_scale")
        for up_s, down_s, mid_s in C_LORA_STYLES:
            if x + up_s in lora:
                mid = lora.get(x + mid_s) if mid_s else None
                if mid is not None:
                    loaded.add(x + mid_s)
                loaded.update({x + up_s, x + down_s})
                patches[target] = (lora[x + up_s], lora[x + down_s], alpha, mid)
                break
        for suffix in (".w_norm", ".b_norm", ".diff", ".diff_b", ".set_weight"):
            if x + suffix in lora:
                loaded.add(x + suffix)
    return patches, [k for k in lora if k not in loaded]


def comfy_delta(patch, weight_shape, rows: int | None = None) -> torch.Tensor:
    """weight_adapter/lora.py calculate_weight (:224-281), strength 1, no DoRA/mid; ``rows``: only
    the first output rows."""
    up, down, alpha, _ = patch
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    rows = rows or weight_shape[0]
    return scale * (up.flatten(1)[:rows].double() @ down.flatten(1).double()).reshape(rows, *weight_shape[1:])


def comfy_model_keys(a: Arch) -> tuple[dict, dict]:
    """ComfyUI's internal weight keys and shapes of this model: UNet via its diffusers->LDM map
    (the real map covers every diffusers weight, checked below), text encoders as
    ``clip_x.transformer.<HF name>``."""
    m = d2l(a.family)
    unet = {f"diffusion_model.{m[k]}": s for k, s in a.unet_params.items()}
    clip = {f"{TE_FILE_KEY[a.family][comp]}.transformer.{k}": s
            for comp, ps in a.te_params.items() for k, s in ps.items()}
    return unet, clip


def comfy_check(a: Arch, lora: dict, key_map: dict | None = None) -> tuple[dict, list]:
    """Load our file as ComfyUI's LoraLoader would; assert every patch lands on a real weight with a
    compatible shape (``add_patches`` drops unknown keys; ``calculate_weight`` reshapes to the
    weight).  Returns (patches, keys not loaded)."""
    unet, clip = comfy_model_keys(a)
    km = key_map if key_map is not None else comfy_key_map(unet, comfy_unet_config(a.unet_config), clip)
    patches, missing = comfy_load_lora(lora, km)
    shapes = {**unet, **clip}
    for target, (up, down, _, _) in patches.items():
        assert target in shapes, f"ComfyUI would drop the patch for {target}"
        assert up.flatten(1).shape[0] * down.flatten(1).shape[1] == math.prod(shapes[target]), target
    return patches, missing


# --------------------------------------------------------------------------------------------
# AUTOMATIC1111 v1.10 (extensions-builtin/Lora), re-implemented
# --------------------------------------------------------------------------------------------

A_SUFFIX = {"resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                        "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1",
                        "conv_shortcut": "skip_connection"}}


def a1111_convert(key: str, is_sd2: bool) -> str:
    """networks.py convert_diffusers_name_to_compvis."""
    def match(rx):
        m = re.match(rx, key)
        return None if m is None else [int(g) if re.match(r"\d+", g) else g for g in m.groups()]

    if (m := match(r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if (m := match(r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{m[0]}"
    if (m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = A_SUFFIX.get(m[1], {}).get(m[3], m[3])
        sub = 1 if m[1] == "attentions" else 0
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{sub}_{suffix}"
    if (m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = A_SUFFIX.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if (m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = A_SUFFIX.get(m[1], {}).get(m[3], m[3])
        sub = 1 if m[1] == "attentions" else 0
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{sub}_{suffix}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if (m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if (m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        if is_sd2:
            rest = m[1]
            rest = (rest.replace("mlp_fc1", "mlp_c_fc") if "mlp_fc1" in rest else
                    rest.replace("mlp_fc2", "mlp_c_proj") if "mlp_fc2" in rest else
                    rest.replace("self_attn", "attn"))
            return f"model_transformer_resblocks_{m[0]}_{rest}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if (m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        rest = m[1]
        rest = (rest.replace("mlp_fc1", "mlp_c_fc") if "mlp_fc1" in rest else
                rest.replace("mlp_fc2", "mlp_c_proj") if "mlp_fc2" in rest else
                rest.replace("self_attn", "attn"))
        return f"1_model_transformer_resblocks_{m[0]}_{rest}"
    return key


@dataclass
class AModule:
    kind: str                # "linear", "conv", "mha", "other"
    shape: tuple = ()        # weight shape (MHA: in_proj_weight)
    mha_child: bool = False  # out_proj of an nn.MultiheadAttention: applied only through its parent


OPENCLIP = [(r"self_attn\.[qkv]_proj\.weight", "attn.in_proj_weight"),
            (r"self_attn\.out_proj", "attn.out_proj"), (r"mlp\.fc1", "mlp.c_fc"),
            (r"mlp\.fc2", "mlp.c_proj"), (r"layer_norm1", "ln_1"), (r"layer_norm2", "ln_2")]


def ldm_checkpoint(a: Arch) -> dict:
    """Original-layout checkpoint keys and shapes (algorithms.md §4.10): ``model.diffusion_model.*``;
    SD1 ``cond_stage_model.transformer.text_model.*``; SD2 / SDXL-G OpenCLIP
    ``….model.transformer.resblocks.N.{attn.in_proj_weight (q;k;v), attn.out_proj, mlp.c_fc, …}``;
    SDXL ``conditioner.embedders.{0,1}``.  Only the encoder layers are needed here."""
    m = d2l(a.family)
    out = {f"model.diffusion_model.{m[k]}": s for k, s in a.unet_params.items()}
    prefixes = {"sd1": {"text_encoder": ("cond_stage_model.transformer.", False)},
                "sd2": {"text_encoder": ("cond_stage_model.model.", True)},
                "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", False),
                         "text_encoder_2": ("conditioner.embedders.1.model.", True)}}[a.family]
    for comp, (prefix, openclip) in prefixes.items():
        for k, s in a.te_params[comp].items():
            if ".encoder.layers." not in k:
                continue
            if not openclip:
                out[prefix + k] = s
                continue
            m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", k)
            i, rest = m.group(1), m.group(2)
            for rx, repl in OPENCLIP:
                if re.match(rx, rest):
                    if repl.endswith("in_proj_weight"):
                        rest, s = repl, (3 * s[0], s[1])
                    else:
                        rest = re.sub(rx, repl, rest)
                    break
            out[f"{prefix}transformer.resblocks.{i}.{rest}"] = s
    return out


def a1111_layer_mapping(ckpt: dict, family: str) -> dict:
    """assign_network_names_to_compvis_modules: every module of ``sd_model.model`` and of the
    text encoder(s) (SDXL: ``f"{i}_"`` + embedder i's), dots as underscores."""
    modules: dict[str, AModule] = {}
    for key, shape in ckpt.items():
        if key.startswith("model."):
            name = key[len("model."):]
        elif key.startswith("cond_stage_model."):
            name = key[len("cond_stage_model."):]
        elif key.startswith("conditioner.embedders."):
            i, _, rest = key[len("conditioner.embedders."):].partition(".")
            name = f"{i}.{rest}"
        else:
            continue
        if name.endswith(".in_proj_weight"):
            modules[name[:-len(".in_proj_weight")]] = AModule("mha", shape)
        elif name.endswith(".weight"):
            mod = name[:-len(".weight")]
            kind = {2: "linear", 4: "conv"}.get(len(shape), "other")
            modules[mod] = AModule(kind, shape, mod.endswith(".attn.out_proj") and ".resblocks." in mod)
    for mod in list(modules):  # containers (ModuleList etc.) are named modules too
        parts = mod.split(".")
        for j in range(1, len(parts)):
            modules.setdefault(".".join(parts[:j]), AModule("other"))
    # SDXL: f"{i}_{name}" for embedder i - the same as replacing the dot after "i"
    return {n.replace(".", "_"): m for n, m in modules.items()}


def a1111_updown(mod: AModule, orig_shape: tuple, up: torch.Tensor, down: torch.Tensor, alpha):
    """network_lora.NetworkModuleLora (create_module + calc_updown) and network.finalize_updown:
    raises where A1111 would; returns a function computing the update (float64), so that checking
    every layer of SDXL does not materialise every ΔW."""
    if mod.kind in ("linear", "mha"):
        up_shape = (up.shape[0], math.prod(up.shape[1:]))
        down_shape = (down.shape[0], math.prod(down.shape[1:]))
    elif mod.kind == "conv":
        d = tuple(down.shape) if down.ndim == 4 else (down.shape[0], down.shape[1], 1, 1)
        kernel = d[2:] if d[2:] == (1, 1) else tuple(mod.shape[2:])
        down_shape = (d[0], d[1], *kernel)             # Conv2d(in, r, kernel).weight
        if math.prod(down_shape) != down.numel():
            raise RuntimeError(f"cannot reshape down {tuple(down.shape)} to {down_shape}")
        up_shape = (up.shape[0], up.shape[1], 1, 1)    # Conv2d(r, out, 1x1).weight
        if math.prod(up_shape) != up.numel():
            raise RuntimeError(f"cannot reshape up {tuple(up.shape)} to {up_shape}")
    else:
        raise AssertionError(f"LoRA matched a layer of unsupported type {mod.kind}")
    if up_shape[1] != down_shape[0]:
        raise RuntimeError("rank mismatch")
    out_shape = [up_shape[0], down_shape[1]] + list(down_shape[2:])
    final = tuple(orig_shape) if math.prod(out_shape) == math.prod(orig_shape) else tuple(out_shape)
    if final != tuple(orig_shape):
        raise RuntimeError(f"size mismatch {final} vs {tuple(orig_shape)}")
    scale = alpha / down_shape[0] if alpha is not None else 1.0

    def updown(rows: int | None = None):  # rows: only the first output rows
        rows = rows or final[0]
        u, dn = up.reshape(up_shape[0], -1)[:rows].double(), down.reshape(down_shape[0], -1).double()
        return (u @ dn).reshape(rows, *out_shape[1:]).reshape(rows, *final[1:]) * scale

    return updown


def a1111_load(lora: dict, mapping: dict) -> tuple[dict, dict, dict]:
    """networks.load_network: (modules by network layer name, unmatched keys, bundled embeddings)."""
    is_sd2 = "model_transformer_resblocks" in mapping
    matched, failed, bundle = {}, {}, {}
    for key, w in lora.items():
        base, _, part = key.partition(".")
        if base == "bundle_emb":
            emb_name, vec_name = part.split(".", 1)
            d = bundle.setdefault(emb_name, {})
            if vec_name.split(".")[0] == "string_to_param":
                d["string_to_param"] = {vec_name.split(".", 1)[1]: w}
            else:
                d[vec_name] = w
        name = a1111_convert(base, is_sd2)
        mod = mapping.get(name)
        if mod is None and (m := re.match(r"(.*)_([qkv]_proj)$", name)):
            mod = mapping.get(m.group(1))
        if mod is None and "lora_unet" in base:
            name = base.replace("lora_unet", "diffusion_model")
            mod = mapping.get(name)
        elif mod is None and "lora_te1_text_model" in base:
            name = base.replace("lora_te1_text_model", "0_transformer_text_model")
            mod = mapping.get(name)
            if mod is None:
                name = base.replace("lora_te1_text_model", "transformer_text_model")
                mod = mapping.get(name)
        if mod is None:
            failed[key] = name
            continue
        matched.setdefault(name, (mod, {}, base))[1][part] = w
    modules = {}
    for name, (mod, w, base) in matched.items():
        if not {"lora_up.weight", "lora_down.weight"} <= set(w):
            raise AssertionError(f"no module type accepts {sorted(w)} for {name}")
        alpha = w["alpha"].item() if "alpha" in w else None
        modules[name] = (mod, w["lora_up.weight"], w["lora_down.weight"], alpha, base)
    return modules, failed, bundle


def a1111_apply(modules: dict, mapping: dict) -> dict:
    """network_apply_weights over every patched layer: {network module name: ΔW function}; a LoRA
    module that no layer applies is missing from the result."""
    applied = {}
    for layer, mod in mapping.items():
        if mod.kind in ("linear", "conv") and not mod.mha_child and layer in modules:
            m, up, down, alpha, _ = modules[layer]
            applied[layer] = a1111_updown(m, mod.shape, up, down, alpha)
        elif mod.kind == "mha":
            parts = {p: modules.get(f"{layer}_{p}_proj") for p in ("q", "k", "v", "out")}
            if all(v is not None for v in parts.values()):
                d = mod.shape[1]
                for p, (m, up, down, alpha, _) in parts.items():
                    applied[f"{layer}_{p}_proj"] = a1111_updown(m, (d, d), up, down, alpha)
    return applied


def a1111_check(a: Arch, lora: dict, ckpt: dict | None = None):
    mapping = a1111_layer_mapping(ckpt if ckpt is not None else ldm_checkpoint(a), a.family)
    modules, failed, bundle = a1111_load(lora, mapping)
    applied = a1111_apply(modules, mapping)
    return modules, failed, applied, bundle


def a1111_addnet_hash(path: Path) -> str:
    """modules/hashes.py addnet_hash_safetensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(n + 8)
        return hashlib.sha256(f.read()).hexdigest()


# --------------------------------------------------------------------------------------------
# 0. Names
# --------------------------------------------------------------------------------------------

def test_kohya_key_examples():
    assert kohya_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "lora_unet") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya_key("text_model.encoder.layers.0.self_attn.q_proj", "te") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    # transformers 5: CLIPTextModel has no .text_model
    assert kohya_key("encoder.layers.11.mlp.fc2", "lora_te1") == \
        "lora_te1_text_model_encoder_layers_11_mlp_fc2"
    assert kohya_key("text_model.encoder.layers.31.self_attn.out_proj", "te2") == \
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"
    assert layer_key("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "sdxl") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert layer_key("unet.mid_block.attentions.0.transformer_blocks.9.ff.net.2", "sdxl") == \
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"
    assert layer_key("unet.up_blocks.0.attentions.0.proj_out", "sdxl") == \
        "lora_unet_output_blocks_0_1_proj_out"
    assert layer_key("unet.input_blocks.1.1.proj_in", "sd1") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert layer_key("diffusion_model.input_blocks.4.1.proj_in", "sdxl") == \
        "lora_unet_input_blocks_4_1_proj_in"
    assert layer_key("clip_g.transformer.text_model.encoder.layers.3.mlp.fc1", "sdxl") == \
        "lora_te2_text_model_encoder_layers_3_mlp_fc1"
    for bad in ("bad", "lora_vae"):
        with pytest.raises(ValueError):
            kohya_key("a.b", bad)
    with pytest.raises(ValueError):
        kohya_key("a..b", "unet")


@pytest.mark.parametrize("name", ["unet.down_blocks.0.attentions.0.norm1", "unet.foo.bar",
                                  "unet.down_blocks.3.attentions.0.proj_in",  # SD1's last level has none
                                  "unet.up_blocks.0.attentions.0.proj_in",
                                  "unet.down_blocks.9.resnets.0.conv1",
                                  "text_encoder.encoder.layers.0.layer_norm1",
                                  "text_encoder.text_model.embeddings.token_embedding",
                                  "text_encoder_2.encoder.layers.0.mlp.fc1",  # SD1 has one encoder
                                  "down_blocks.0.attentions.0.proj_in"])     # no component
def test_unmappable_layer_names_are_refused(name):
    with pytest.raises(ValueError):
        normalize_layer_name(name, "sd1")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_our_ldm_names_equal_comfyui_unet_to_diffusers(family):
    """The library's diffusers<->LDM conversion gives, for every weight of the real UNet, the LDM
    name ComfyUI's map gives - and ComfyUI's map covers every weight (so its image is the model)."""
    a = arch(family)
    d2l = comfy_unet_to_diffusers(comfy_unet_config(a.unet_config))
    layout = UNetLayout.from_config(a.unet_config)
    assert layout == DEFAULT_LAYOUTS[family]
    missing = [k for k in a.unet_params if k not in d2l]
    assert not missing, missing[:5]
    for k in a.unet_params:
        module, _, p = k.rpartition(".")
        assert f"{layout.to_ldm(module)}.{p}" == d2l[k], k
        assert layout.to_diffusers(layout.to_ldm(module)) == module


def test_layout_from_a_tiny_config():
    from tiny_models import tiny_unet

    unet = tiny_unet("sdxl")
    layout = UNetLayout.from_config(unet.config)
    cfg = comfy_unet_config(dict(unet.config))
    d2l = comfy_unet_to_diffusers(cfg)
    for k in unet.state_dict():
        module, _, p = k.rpartition(".")
        if k in d2l:
            assert f"{layout.to_ldm(module)}.{p}" == d2l[k], k


# --------------------------------------------------------------------------------------------
# 1. ComfyUI
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,preset", [("sd1", "attn"), ("sd1", "kohya"), ("sd1", "all"),
                                           ("sd2", "kohya"), ("sdxl", "attn"), ("sdxl", "kohya"),
                                           ("sdxl", "all")])
def test_comfyui_loads_every_key(tmp_path_factory, family, preset):
    a = arch(family)
    _, layers, lora = saved(tmp_path_factory, family, preset)
    patches, missing = comfy_check(a, lora)
    assert missing == []  # no "lora key not loaded"
    expected = {expected_target(a, n)[0]: n for n in layers}
    assert set(patches) == set(expected)  # each layer patches exactly the module it was trained on
    for target in sample(expected):  # the update ComfyUI applies is ours
        up, down, alpha, _ = patches[target]
        d0, u0, a0 = layers[expected[target]]
        ref = weight_delta(d0, u0[:ROWS], a0, dtype=torch.float64)
        theirs = comfy_delta(patches[target], a.modules[expected[target]], ROWS)
        assert_near(theirs, weight_delta(down, up[:ROWS], alpha, torch.float64), rtol=1e-12)
        assert_near(theirs, ref, rtol=2e-3)  # the file holds fp16 factors


# --------------------------------------------------------------------------------------------
# 2. AUTOMATIC1111 / Forge
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,preset", [("sd1", "attn"), ("sd1", "kohya"), ("sd1", "all"),
                                           ("sd2", "kohya"), ("sdxl", "attn"), ("sdxl", "kohya"),
                                           ("sdxl", "all")])
def test_a1111_loads_and_applies_every_key(tmp_path_factory, family, preset):
    a = arch(family)
    _, layers, lora = saved(tmp_path_factory, family, preset)
    modules, failed, applied, _ = a1111_check(a, lora)
    assert failed == {}
    assert set(modules) == set(applied)  # every matched module is applied to a weight
    assert len(modules) == len(layers)
    # each key lands on the module it was trained for, with the update we meant
    by_key = {layer_key(n, family): n for n in layers}
    for name in sample(applied):
        n = by_key[modules[name][4]]
        ldm = expected_target(a, n)[1]
        if n.startswith(("text_encoder_2.", "text_encoder.")) and family in ("sd2", "sdxl") and \
                (family == "sd2" or n.startswith("text_encoder_2.")):
            i, rest = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", ldm).groups()
            rest = {"self_attn.q_proj": "attn_q_proj", "self_attn.k_proj": "attn_k_proj",
                    "self_attn.v_proj": "attn_v_proj", "self_attn.out_proj": "attn_out_proj",
                    "mlp.fc1": "mlp_c_fc", "mlp.fc2": "mlp_c_proj"}[rest]
            want = f"{'1_' if family == 'sdxl' else ''}model_transformer_resblocks_{i}_{rest}"
        elif n.startswith("text_encoder"):
            want = ("0_" if family == "sdxl" else "") + "transformer_" + ldm.replace(".", "_")
        else:
            want = "diffusion_model_" + ldm.replace(".", "_")
        assert name == want
        d0, u0, a0 = layers[n]
        assert_near(applied[name](ROWS), weight_delta(d0, u0[:ROWS], a0, torch.float64), rtol=2e-3)


def test_a1111_drops_a_partial_openclip_attention():
    """Why save_lora refuses q/k/v without out_proj on SDXL's second encoder: A1111 would match
    the keys and silently never apply them."""
    a = arch("sdxl")
    mapping = a1111_layer_mapping(ldm_checkpoint(a), "sdxl")
    sd = {f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj.{w}": torch.zeros(2, 1280)
          for p in "qkv" for w in ("lora_up.weight", "lora_down.weight")}
    sd = {k: (v.T.contiguous() if "up" in k else v) for k, v in sd.items()}
    modules, failed, bundle = a1111_load(sd, mapping)
    assert failed == {} and len(modules) == 3
    assert a1111_apply(modules, mapping) == {}


def test_sshs_model_hash_is_a1111s_hash(tmp_path_factory):
    path, _, _ = saved(tmp_path_factory, "sd1")
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["sshs_model_hash"] == a1111_addnet_hash(path)


# --------------------------------------------------------------------------------------------
# 3. diffusers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,preset", [("sd1", "kohya"), ("sd1", "all"), ("sd2", "kohya"),
                                           ("sdxl", "kohya"), ("sdxl", "all")])
def test_diffusers_converts_every_key(tmp_path_factory, family, preset):
    """What ``load_lora_weights`` does before PEFT injects the layers (lora_pipeline.py
    ``lora_state_dict``, ``load_lora_into_unet`` -> peft.py ``load_lora_adapter``,
    lora_base.py ``_load_lora_into_text_encoder``): every key converts, and every converted key
    names a real module with factor shapes PEFT's LoRA layer for it has."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft)

    a = arch(family)
    _, layers, sd = saved(tmp_path_factory, family, preset)
    assert all(k.startswith(("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")) for k in sd)
    sd = _maybe_map_sgm_blocks_to_diffusers(dict(sd), a.unet_model.config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(sd)  # raises on leftover keys
    assert len(alphas) == len(layers)

    def check(peft_sd, model):
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

    unet_sd = convert_unet_state_dict_to_peft(
        {k[len("unet."):]: v for k, v in converted.items() if k.startswith("unet.")})
    seen = {f"unet.{m}" for m in check(unet_sd, a.unet_model)}
    for comp, te in a.te_models.items():
        te_sd = {k[len(comp) + 1:]: v for k, v in converted.items() if k.startswith(comp + ".")}
        te_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd))
        if not hasattr(te, "text_model"):
            te_sd = {k.removeprefix("text_model."): v for k, v in te_sd.items()}
        seen |= {f"{comp}.{m}" for m in check(te_sd, te)}
    assert seen == set(layers)


# --------------------------------------------------------------------------------------------
# 4. Round trip, metadata, ΔW, safety
# --------------------------------------------------------------------------------------------

def small_layers(family="sd1", rank=4, seed=1):
    a = arch(family)
    names = [n for n in a.modules if ".attentions.0.transformer_blocks.0." in n and "down_blocks.1" in n]
    names += [n for n in a.modules if "layers.0." in n and not n.startswith("unet.")]
    names += ["unet.down_blocks.1.resnets.0.conv1", "unet.mid_block.attentions.0.proj_in"]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        shape = a.modules[n]
        if len(shape) == 4:
            out[n] = (torch.randn(rank, *shape[1:], generator=g),
                      torch.randn(shape[0], rank, 1, 1, generator=g), 3.0)
        else:
            out[n] = (torch.randn(rank, shape[1], generator=g), torch.randn(shape[0], rank, generator=g), 0.3)
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_round_trip_fp32_is_exact(tmp_path, family):
    layers = small_layers(family)
    path = save_lora(tmp_path, "rt", layers, family=family, dtype="fp32")
    loaded, meta = load_lora(path)
    assert set(loaded) == {normalize_layer_name(n, family) for n in layers}
    for n, (down, up, alpha) in layers.items():
        got = loaded[normalize_layer_name(n, family)]
        assert got.down.dtype == torch.float32 and torch.equal(got.down, down) and torch.equal(got.up, up)
        assert got.alpha == torch.tensor(alpha, dtype=torch.float32).item()  # stored as an fp32 scalar
    # the caller's own (transformers-5) module names come back with module_names
    own, _ = load_lora(path, module_names=list(arch(family).modules))
    assert set(own) == set(layers)
    for n in layers:
        assert torch.equal(own[n].down, layers[n][0])


def test_round_trip_fp16_default_and_file_layout(tmp_path):
    layers = small_layers("sdxl")
    path = save_lora(tmp_path, "rt16", layers, family="sdxl")
    raw = safetensors.torch.load_file(str(path))
    loaded, _ = load_lora(path, module_names=list(arch("sdxl").modules))
    for n, (down, up, alpha) in layers.items():
        key = layer_key(n, "sdxl")
        assert raw[f"{key}.lora_down.weight"].dtype == torch.float16
        assert raw[f"{key}.alpha"].ndim == 0 and raw[f"{key}.alpha"].dtype == torch.float32
        assert raw[f"{key}.alpha"].item() == torch.tensor(alpha).item()  # fp32: 0.3 is not fp16's 0.2998
        assert torch.equal(loaded[n].down, down.half()) and torch.equal(loaded[n].up, up.half())
    conv = layer_key("unet.down_blocks.1.resnets.0.conv1", "sdxl")
    assert conv == "lora_unet_input_blocks_4_0_in_layers_2"
    assert raw[f"{conv}.lora_down.weight"].shape == (4, 320, 3, 3)
    assert raw[f"{conv}.lora_up.weight"].shape == (640, 4, 1, 1)
    assert raw["lora_unet_middle_block_1_proj_in.lora_down.weight"].ndim == 2  # SDXL: Linear
    sd1 = save_lora(tmp_path, "rt_sd1", small_layers("sd1"), family="sd1")
    raw1 = safetensors.torch.load_file(str(sd1))
    assert raw1["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape == (4, 1280, 1, 1)
    assert raw1["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"].shape == (1280, 4, 1, 1)


def test_metadata(tmp_path):
    layers = small_layers("sd1")
    tags = {"5_cat": {"my_cat": 5, "photo": 3}}
    path = save_lora(tmp_path, "meta", layers, family="sd1", metadata={
        "steps": 400, "learning_rate": 1e-4, "resolution": 512, "num_train_images": 5,
        "tag_frequency": tags, "training_started_at": 1700000000.5, "ss_seed": 7,
        "ss_network_dim": 99, "instance_prompt": "a photo of sks cat"})
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4"  # computed, not the caller's 99
    assert meta["ss_network_alpha"] == "Dynamic"  # 3.0 on convs, 0.3 on linears
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "meta" and meta["ss_steps"] == "400"
    assert meta["ss_learning_rate"] == "0.0001" and meta["ss_resolution"] == "(512, 512)"
    assert meta["ss_num_train_images"] == "5" and meta["ss_seed"] == "7"
    assert meta["ss_training_started_at"] == "1700000000.5"
    assert json.loads(meta["ss_tag_frequency"]) == tags
    assert meta["likeness.instance_prompt"] == "a photo of sks cat"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.title"] == "meta"
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sshs_model_hash"])
    _, loaded_meta = load_lora(path)
    assert loaded_meta == meta


@pytest.mark.parametrize("family,prediction,version,v2,arch_name", [
    ("sd1", "eps", "sd_v1", "False", "stable-diffusion-v1/lora"),
    ("sd2", "v", "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora"),
    ("sd2", "eps", "sd_v2", "True", "stable-diffusion-v2-512/lora"),
    ("sdxl", "eps", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora")])
def test_base_model_metadata_drives_a1111s_version_filter(tmp_path, family, prediction, version, v2,
                                                          arch_name):
    layers = {n: v for n, v in small_layers(family).items() if not n.startswith("unet.")}
    path = save_lora(tmp_path, "v", layers, family=family, prediction=prediction)
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == version and meta["ss_v2"] == v2
    assert meta["modelspec.architecture"] == arch_name
    # network.NetworkOnDisk.detect_version
    detected = ("sdxl" if meta["ss_base_model_version"].startswith("sdxl_") else
                "sd2" if meta["ss_v2"] == "True" else "sd1")
    assert detected == family
    assert load_lora(path)[0].keys() == {normalize_layer_name(n, family) for n in layers}


def test_weight_delta_matches_float64_reference():
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 32, 3, 3, generator=g), torch.randn(64, 4, 1, 1, generator=g)
    ref = torch.einsum("or,rikl->oikl", up[:, :, 0, 0].double(), down.double()) * (2.5 / 4)
    torch.testing.assert_close(weight_delta(down, up, 2.5, torch.float64), ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(weight_delta(down, up, torch.tensor(2.5)).double(), ref, rtol=1e-5, atol=1e-5)
    down, up = torch.randn(8, 77, generator=g), torch.randn(33, 8, generator=g)
    ref = (up.double() @ down.double()) * (1.0 / 8)
    torch.testing.assert_close(weight_delta(down, up, 1.0, torch.float64), ref, rtol=1e-12, atol=0)


def test_weight_delta_from_file(tmp_path):
    layers = {n: v for n, v in small_layers("sd1").items() if n.endswith(("attn1.to_q", "q_proj"))}
    g = torch.Generator().manual_seed(5)
    layers["unet.conv_in"] = (torch.randn(4, 4, 3, 3, generator=g),
                              torch.randn(320, 4, 1, 1, generator=g), 3.0)
    path = save_lora(tmp_path, "dw", layers, family="sd1", dtype="fp32")
    loaded, _ = load_lora(path, module_names=list(arch("sd1").modules))
    from_layers = lora_state_dict_to_weight_delta(loaded, dtype=torch.float64)
    from_raw = lora_state_dict_to_weight_delta(safetensors.torch.load_file(str(path)), dtype=torch.float64)
    for n, (down, up, alpha) in layers.items():
        ref = weight_delta(down, up, torch.tensor(alpha).item(), torch.float64)  # alpha is stored as fp32
        assert torch.equal(from_layers[n], ref) and torch.equal(from_raw[layer_key(n, "sd1")], ref)
    assert from_layers["unet.conv_in"].shape == (320, 4, 3, 3)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "x.safetensors", "con", "two words", ".hidden"])
def test_bad_names_write_nothing(tmp_path, name):
    with pytest.raises(ValueError):
        save_lora(tmp_path / "loras", name, small_layers(), family="sd1")
    assert _listing(tmp_path) == [] and not (tmp_path / "evil.safetensors").exists()


def _bad_layers():
    ok = small_layers()
    first = next(iter(ok))
    d, u, a = ok[first]
    yield {first: (d, u, 0.0)}                                  # alpha must be > 0
    yield {first: (d, u, float("nan"))}
    yield {first: (d[:3], u, a)}                                 # rank mismatch
    yield {first: (d.reshape(*d.shape, 1, 1), u, a)}             # 4-D down with 2-D up
    yield {first: (d * float("inf"), u, a)}
    yield {**ok, first: (d * 1e6, u, a)}                         # finite in fp32, infinite in fp16
    yield {"unet.down_blocks.0.attentions.0.norm": (d, u, a)}    # not a Linear/Conv the loaders map
    yield {"text_encoder.encoder.layers.0.layer_norm1": (d, u, a)}
    yield {first: (d, u, a),                                      # the same module twice
           "unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q": (d, u, a)}
    yield {}


@pytest.mark.parametrize("layers", list(_bad_layers()), ids=[f"case{i}" for i in range(10)])
def test_bad_layers_write_nothing(tmp_path, layers):
    with pytest.raises(ValueError):
        save_lora(tmp_path, "bad", layers, family="sd1")
    assert _listing(tmp_path) == []


def test_partial_openclip_attention_is_refused(tmp_path):
    layers = {n: v for n, v in small_layers("sdxl").items()
              if not (n.startswith("text_encoder_2.") and n.endswith("out_proj"))}
    with pytest.raises(ValueError, match="q_proj, k_proj, v_proj and out_proj"):
        save_lora(tmp_path, "partial", layers, family="sdxl")
    assert _listing(tmp_path) == []


def test_overwrite_only_when_asked(tmp_path):
    path = save_lora(tmp_path, "mine", small_layers(seed=1), family="sd1")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_lora(tmp_path, "mine", small_layers(seed=2), family="sd1")
    assert path.read_bytes() == before and _listing(tmp_path) == ["mine.safetensors"]
    save_lora(tmp_path, "mine", small_layers(seed=2), family="sd1", overwrite=True)
    assert path.read_bytes() != before and _listing(tmp_path) == ["mine.safetensors"]


def test_load_refuses_pickles_and_variants(tmp_path):
    pt = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    with pytest.raises(ValueError, match="safetensors"):
        load_lora(pt)
    dora = tmp_path / "dora.safetensors"
    safetensors.torch.save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3),
                                 "lora_unet_conv_in.lora_up.weight": torch.zeros(320, 1, 1, 1),
                                 "lora_unet_conv_in.dora_scale": torch.zeros(320, 1, 1, 1)}, str(dora))
    with pytest.raises(ValueError, match="DoRA"):
        load_lora(dora)


def test_loads_third_party_naming(tmp_path):
    """A kohya SDXL file read as diffusers names, and an SD1 file in LDM names (what ComfyUI's
    LoraSave / other tools write) read the same as ours; no alpha reads as scale 1."""
    layers = small_layers("sd1", rank=2)
    ours = lf.lora_state_dict(layers, family="sd1", dtype="fp32")
    ldm = {}
    for k, v in ours.items():
        base, _, part = k.partition(".")
        if base.startswith("lora_unet_"):
            canon = normalize_layer_name("unet." + lf._dotted(base[len("lora_unet_"):]), "sd1")
            base = "lora_unet_" + DEFAULT_LAYOUTS["sd1"].to_ldm(canon[5:]).replace(".", "_")
        if part != "alpha":
            ldm[f"{base}.{part}"] = v
    p = tmp_path / "ldm.safetensors"
    safetensors.torch.save_file(ldm, str(p))
    loaded, _ = load_lora(p, family="sd1")
    assert set(loaded) == {normalize_layer_name(n, "sd1") for n in layers}
    assert all(l.alpha == l.down.shape[0] for l in loaded.values())


# --------------------------------------------------------------------------------------------
# 5. Bundled embeddings (pivotal tuning)
# --------------------------------------------------------------------------------------------

A1111_EXPECTED_SHAPE = {"sd1": 768, "sd2": 1024, "sdxl": 2048}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_bundled_embeddings(tmp_path, family):
    g = torch.Generator().manual_seed(0)
    widths = dict(lf.FAMILY_ENCODERS[family])
    vectors = {k: torch.randn(2, w, generator=g) for k, w in widths.items()}
    layers = {n: v for n, v in small_layers(family).items() if n.startswith("unet.")}
    path = save_lora(tmp_path, "piv", layers, family=family, bundle_emb={"sks": vectors})
    lora = safetensors.torch.load_file(str(path))
    # A1111: networks.load_network collects bundle_emb.*; textual_inversion.create_embedding_from_data
    a = arch(family)
    modules, failed, applied, bundle = a1111_check(a, lora)
    assert set(failed) == {k for k in lora if k.startswith("bundle_emb.")}  # consumed as embeddings only
    data = bundle["sks"]
    if "string_to_param" in data:
        (vec,) = data["string_to_param"].values()
        shape, n = vec.shape[-1], vec.shape[0]
    else:
        assert set(data) == {"clip_l", "clip_g"}
        shape, n = data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data["clip_g"].shape[0]
    assert (shape, n) == (A1111_EXPECTED_SHAPE[family], 2)
    assert len(applied) == len(layers)
    # ComfyUI: sd1_clip.load_embed on this file (in an embeddings folder), per tokenizer key
    for key, width in widths.items():
        embed = lora
        out = None
        if "string_to_param" in embed:
            out = next(iter(embed["string_to_param"].values()))
        elif key in embed:
            out = embed[key]
        else:
            found = [v for k, v in embed.items()
                     if k.startswith("bundle_emb.") and k.endswith(".string_to_param.*")]
            if not found:
                found = [v for k, v in embed.items()
                         if k.startswith("bundle_emb.") and k.endswith(f".{key}")]
            out = torch.cat(found) if found else next(iter(embed.values()))
        assert out.shape == (2, width)
        torch.testing.assert_close(out, vectors[key], rtol=0, atol=0)
    # ComfyUI's LoraLoader: only the bundle keys are "not loaded"
    _, missing = comfy_check(a, lora)
    assert set(missing) == {k for k in lora if k.startswith("bundle_emb.")}
    # diffusers: not a kohya file for lora_state_dict, then "Invalid LoRA checkpoint" (documented)
    assert not all(k.startswith(("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")) for k in lora)
    assert not all("lora" in k for k in lora)
    # ours
    assert {k: v.keys() for k, v in load_bundled_embeddings(path).items()} == {"sks": vectors.keys()}
    assert load_lora(path)[0].keys() == {normalize_layer_name(n, family) for n in layers}


def test_bundle_for_a_tiny_model(tmp_path):
    """Tiny test models have narrow encoders; their widths are passed along."""
    layers = {n: v for n, v in small_layers("sd1").items() if n.startswith("unet.")}
    vec = torch.randn(3, 32)
    with pytest.raises(ValueError):
        save_lora(tmp_path, "tiny", layers, family="sd1", bundle_emb={"sks": vec})
    path = save_lora(tmp_path, "tiny", layers, family="sd1", bundle_emb={"sks": vec},
                     bundle_widths={"clip_l": 32})
    assert torch.equal(load_bundled_embeddings(path, "sd1")["sks"]["clip_l"], vec)


def test_bad_bundles_write_nothing(tmp_path):
    layers = small_layers("sdxl")
    for bundle in ({"a.b": {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}},
                   {"sks": {"clip_l": torch.zeros(1, 768)}},
                   {"sks": torch.zeros(1, 768)}):
        with pytest.raises(ValueError):
            save_lora(tmp_path, "b", layers, family="sdxl", bundle_emb=bundle)
    assert _listing(tmp_path) == []


# --------------------------------------------------------------------------------------------
# 6. Against ComfyUI's own source (a checkout; no import of comfy needed)
# --------------------------------------------------------------------------------------------

def _comfy_checkout() -> Path | None:
    for cand in (os.environ.get("COMFYUI_PATH"), Path.home() / ".cache/likeness/ComfyUI"):
        if cand and (Path(cand) / "comfy" / "lora.py").is_file():
            return Path(cand)
    return None


def _extract(path: Path, names: set[str], namespace: dict, cls: str | None = None) -> dict:
    tree = ast.parse(path.read_text())
    body = tree.body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    nodes = []
    for n in body:
        if isinstance(n, ast.FunctionDef) and n.name in names:
            n.decorator_list = []
            nodes.append(n)
        elif isinstance(n, ast.Assign) and any(getattr(t, "id", None) in names for t in n.targets):
            nodes.append(n)
    found = {getattr(n, "name", None) or n.targets[0].id for n in nodes}
    assert found == names, f"{path.name} changed shape: missing {names - found}"
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


@functools.lru_cache(maxsize=None)
def real_comfy() -> SimpleNamespace:
    root = _comfy_checkout()
    utils = _extract(root / "comfy" / "utils.py",
                     {"UNET_MAP_ATTENTIONS", "TRANSFORMER_BLOCKS", "UNET_MAP_RESNET", "UNET_MAP_BASIC",
                      "unet_to_diffusers"}, {})

    class _Dummy:  # isinstance(model, comfy.model_base.<Other>) is False for our stub model
        pass

    comfy = SimpleNamespace(utils=SimpleNamespace(unet_to_diffusers=utils["unet_to_diffusers"]),
                            model_base=SimpleNamespace(**{n: type(n, (_Dummy,), {}) for n in (
                                "StableCascade_C", "SD3", "AuraFlow", "PixArt", "HunyuanDiT", "Flux",
                                "GenmoMochi", "HunyuanVideo", "HiDream", "ACEStep", "Omnigen2",
                                "QwenImage", "Lumina2", "Kandinsky5", "ACEStep15", "ErnieImage")}))

    class LoRAAdapter:
        def __init__(self, loaded_keys, weights):
            self.loaded_keys, self.weights = loaded_keys, weights

    adapter_ns = _extract(root / "comfy" / "weight_adapter" / "lora.py", {"load"},
                          {"Optional": typing.Optional, "torch": torch}, cls="LoRAAdapter")
    LoRAAdapter.load = classmethod(adapter_ns["load"])
    lora = _extract(root / "comfy" / "lora.py",
                    {"LORA_CLIP_MAP", "load_lora", "model_lora_keys_clip", "model_lora_keys_unet"},
                    {"comfy": comfy, "weight_adapter": SimpleNamespace(adapters=[LoRAAdapter]),
                     "logging": logging, "torch": torch})
    return SimpleNamespace(unet_to_diffusers=utils["unet_to_diffusers"], **{
        k: lora[k] for k in ("load_lora", "model_lora_keys_clip", "model_lora_keys_unet")})


needs_checkout = pytest.mark.skipif(_comfy_checkout() is None,
                                    reason="no ComfyUI checkout (set COMFYUI_PATH)")


@needs_checkout
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_unet_to_diffusers_mirror_matches_comfyui(family):
    cfg = comfy_unet_config(arch(family).unet_config)
    assert comfy_unet_to_diffusers(cfg) == real_comfy().unet_to_diffusers(dict(cfg))


@needs_checkout
@pytest.mark.parametrize("family,preset", [("sd1", "all"), ("sdxl", "kohya")])
def test_comfyui_real_key_maps_and_load_lora(tmp_path_factory, caplog, family, preset):
    """ComfyUI's own model_lora_keys_* and load_lora (from its source) on our file: the same key
    map and patches as the mirror, and no "lora key not loaded"."""
    real = real_comfy()
    a = arch(family)
    unet, clip = comfy_model_keys(a)
    cfg = comfy_unet_config(a.unet_config)

    class Model:  # what model_lora_keys_unet / _clip read: state_dict().keys(), model_config.unet_config
        def __init__(self, keys):
            self.keys, self.model_config = keys, SimpleNamespace(unet_config=cfg)

        def state_dict(self):
            return dict.fromkeys(self.keys)

    km = real.model_lora_keys_unet(Model(unet), {})
    km = real.model_lora_keys_clip(Model(clip), km)
    assert km == comfy_key_map(unet, cfg, clip)
    _, layers, lora = saved(tmp_path_factory, family, preset)
    with caplog.at_level(logging.WARNING):
        patches = real.load_lora(lora, km)
    assert "lora key not loaded" not in caplog.text
    ours, _ = comfy_load_lora(lora, km)
    assert set(patches) == set(ours) == {expected_target(a, n)[0] for n in layers}
    for target, adapter in patches.items():
        up, down, alpha = adapter.weights[:3]
        assert up is ours[target][0] and down is ours[target][1] and alpha == ours[target][2]


# --------------------------------------------------------------------------------------------
# 7. Inside a real ComfyUI (its own UNet / CLIP classes on the meta device)
# --------------------------------------------------------------------------------------------

@pytest.mark.comfyui
@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_inside_comfyui(comfy_root, tmp_path_factory, caplog, family):
    """ComfyUI detects the real diffusers UNet as SD15/SDXL, builds its own models, maps and loads
    our file with zero unloaded keys onto weights of matching size; A1111's mapping of the
    checkpoint ComfyUI would save for that model (``process_*_for_saving``) also matches and
    applies every key."""
    import comfy.lora
    import comfy.model_detection
    import comfy.utils

    # ComfyUI's own detection of a diffusers UNet (as its diffusers loader does), from the shapes
    sd = arch(family).unet_model.state_dict()
    mc = comfy.model_detection.model_config_from_unet_config(
        comfy.model_detection.unet_config_from_diffusers_unet(sd, torch.float16))
    assert type(mc).__name__ == {"sd1": "SD15", "sdxl": "SDXL"}[family]
    model = mc.get_model({}, device="meta")
    clip = mc.clip_target().clip(device="meta", dtype=torch.float16, model_options={})
    km = comfy.lora.model_lora_keys_unet(model, {})
    km = comfy.lora.model_lora_keys_clip(clip, km)
    path, layers, _ = saved(tmp_path_factory, family)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, km)
    assert "lora key not loaded" not in caplog.text
    shapes = {k: tuple(v.shape) for k, v in {**model.state_dict(), **clip.state_dict()}.items()}
    assert len(patches) == len(layers)
    for target, adapter in patches.items():
        up, down = adapter.weights[:2]
        assert target in shapes
        assert up.flatten(1).shape[0] * down.flatten(1).shape[1] == math.prod(shapes[target])
    usd = {k[len("diffusion_model."):]: v for k, v in model.state_dict().items()
           if k.startswith("diffusion_model.")}
    ckpt = {**mc.process_unet_state_dict_for_saving(usd),
            **mc.process_clip_state_dict_for_saving(dict(clip.state_dict()))}
    ckpt = {k: tuple(v.shape) for k, v in ckpt.items()}
    modules, failed, applied, _ = a1111_check(arch(family), lora, ckpt)
    assert failed == {} and set(modules) == set(applied) and len(applied) == len(layers)
