"""ComfyUI v0.20.1's LoRA loading, re-implemented from its source (cited per function; written
anew, not copied): ``comfy/utils.py`` ``unet_to_diffusers`` (:268-400), ``comfy/lora.py``
``model_lora_keys_clip``/``model_lora_keys_unet``/``load_lora`` (:28-205),
``comfy/weight_adapter/lora.py`` ``LoRAAdapter.load``/``calculate_weight`` (:150-281).
``comfy_source`` checks this mirror against the real functions when a checkout is present.
"""
from __future__ import annotations

import functools
import math

import torch

from likeness.trainers.families import family as family_of
from likeness.trainers.seam import ParameterNaming

from .architectures import Arch, arch


def comfy_naming(family: str) -> ParameterNaming:
    """How ComfyUI names a model's parameters: ``diffusion_model.<LDM path>`` and
    ``<encoder key>.transformer.<HF CLIP path>`` (what its host declares)."""
    return ParameterNaming("diffusion_model.", "ldm",
                           {e.key: f"{e.key}.transformer." for e in family_of(family).encoders})


def te_file_key(family: str) -> dict[str, str]:
    """{diffusers component: ComfyUI's encoder key} ("text_encoder" -> "clip_l", ...)."""
    return {e.component: e.key for e in family_of(family).encoders}



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
    clip = {f"{te_file_key(a.family)[comp]}.transformer.{k}": s
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



@functools.lru_cache(maxsize=None)
def d2l(family: str) -> dict:
    """ComfyUI's diffusers -> LDM weight-name map for the real model of ``family``."""
    return comfy_unet_to_diffusers(comfy_unet_config(arch(family).unet_config))
