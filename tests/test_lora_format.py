"""LoRA files (``trainers/formats/kohya_lora.py``): ComfyUI, AUTOMATIC1111 and diffusers load
every key of what we write for the real SD1.5, SD2 and SDXL architectures, and the writer is safe.

The architectures are the real ones built on the ``meta`` device (``oracles.architectures``), so
module names and shapes are exact and nothing is allocated.  The UI loaders' key handling comes
from ``tests/oracles`` (re-implemented from their source; when a ComfyUI checkout is present the
real functions are run on the same files and must agree; ``-m comfyui`` also builds ComfyUI's own
models).
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors
import safetensors.torch
import torch

from likeness.trainers.families import family as family_of
from likeness.trainers.formats import layer_names
from likeness.trainers.formats.kohya_lora import (
    load_bundled_embeddings,
    load_lora,
    lora_state_dict,
    lora_state_dict_to_weight_delta,
    save_lora,
    weight_delta,
)
from likeness.trainers.formats.layer_names import kohya_key, layer_key, normalize_layer_name
from likeness.trainers.formats.unet_names import DEFAULT_LAYOUTS, UNetLayout
from likeness.trainers.seam import ParameterNaming

from oracles.a1111_embedding import A1111_EXPECTED_SHAPE
from oracles.a1111_lora import (a1111_addnet_hash, a1111_apply, a1111_check, a1111_layer_mapping, a1111_load,
                                ldm_checkpoint)
from oracles.architectures import Arch, arch
from oracles.comfy_lora import (comfy_check, comfy_delta, comfy_key_map, comfy_load_lora, comfy_model_keys,
                                comfy_naming, comfy_unet_config, comfy_unet_to_diffusers, d2l, te_file_key)
from oracles.comfy_source import comfy_checkout, real_comfy
from oracles.diffusers_lora import diffusers_load


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



def expected_target(a: Arch, name: str) -> tuple[str, str]:
    """(ComfyUI internal weight key, LDM module name) of a layer, from the ComfyUI map below."""
    canon = normalize_layer_name(name, a.family)
    comp, _, path = canon.partition(".")
    if comp == "unet":
        ldm = d2l(a.family)[path + ".weight"][:-len(".weight")]
        return f"diffusion_model.{ldm}.weight", ldm
    return f"{te_file_key(a.family)[comp]}.transformer.{path}.weight", path



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
    comfy = comfy_naming("sdxl")  # a host's own names, as it declares them
    assert layer_key("diffusion_model.input_blocks.4.1.proj_in", "sdxl", naming=comfy) == \
        "lora_unet_input_blocks_4_1_proj_in"
    assert layer_key("clip_g.transformer.text_model.encoder.layers.3.mlp.fc1", "sdxl", naming=comfy) == \
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


def test_a_host_declares_its_own_naming(tmp_path):
    """Names are read through the host's declared ``ParameterNaming``: ComfyUI's spelling and a
    made-up third host's give the same keys as the diffusers host's, and files read back in them."""
    third = ParameterNaming("model.unet.", "diffusers", {"clip_l": "te.one.", "clip_g": "te.two."})
    comfy = comfy_naming("sdxl")
    layers = small_layers("sdxl")
    d2l_map = d2l("sdxl")

    def spelled(n, naming):
        part, _, path = n.partition(".")
        if part == "unet":
            path = d2l_map[path + ".weight"][:-len(".weight")] if naming.unet_scheme == "ldm" else path
            return naming.unet_prefix + path
        return naming.encoder_prefixes[te_file_key("sdxl")[part]] + path

    for naming in (comfy, third):
        theirs = {spelled(n, naming): v for n, v in layers.items()}
        assert {layer_key(n, "sdxl", naming=naming) for n in theirs} == {layer_key(n, "sdxl") for n in layers}
        assert {normalize_layer_name(n, "sdxl", naming=naming) for n in theirs} == \
            {normalize_layer_name(n, "sdxl") for n in layers}
        path = save_lora(tmp_path, f"n{len(naming.unet_prefix)}", theirs, family="sdxl", naming=naming,
                         dtype="fp32")
        loaded, _ = load_lora(path, module_names=list(theirs), naming=naming)
        assert set(loaded) == set(theirs)
        assert all(torch.equal(loaded[n].down, theirs[n][0]) for n in theirs)
    with pytest.raises(ValueError, match="LDM names"):  # ComfyUI declares LDM UNet paths
        normalize_layer_name("diffusion_model.down_blocks.1.attentions.0.proj_in", "sdxl", naming=comfy)
    with pytest.raises(ValueError, match="start with one of"):  # the diffusers spelling is not ComfyUI's
        normalize_layer_name("unet.down_blocks.1.attentions.0.proj_in", "sdxl", naming=comfy)


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
    a = arch(family)
    _, layers, sd = saved(tmp_path_factory, family, preset)
    assert all(k.startswith(("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")) for k in sd)
    seen, alphas = diffusers_load(a, sd)  # asserts every module exists, with PEFT's factor shapes
    assert len(alphas) == len(layers)
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
    ours = lora_state_dict(layers, family="sd1", dtype="fp32")
    ldm = {}
    for k, v in ours.items():
        base, _, part = k.partition(".")
        if base.startswith("lora_unet_"):
            canon = normalize_layer_name("unet." + layer_names.dotted_path(base[len("lora_unet_"):]), "sd1")
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

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_bundled_embeddings(tmp_path, family):
    g = torch.Generator().manual_seed(0)
    widths = {e.key: e.width for e in family_of(family).encoders}
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
needs_checkout = pytest.mark.skipif(comfy_checkout() is None,
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
