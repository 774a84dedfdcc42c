"""AUTOMATIC1111 v1.10's LoRA loading (``extensions-builtin/Lora``), re-implemented from its
source (written anew, not copied): ``networks.py`` (``convert_diffusers_name_to_compvis``,
``assign_network_names_to_compvis_modules``, ``load_network``, ``network_apply_weights``),
``network_lora.py`` (module shapes), ``network.py``.  Its model's module names come from the
original-layout checkpoint keys (``ldm_checkpoint``).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import Arch
from .comfy_lora import d2l


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
    """Original-layout checkpoint keys and shapes (docs/FORMATS.md): ``model.diffusion_model.*``;
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
