"""The DreamBooth LoRA, full DreamBooth, pivotal tuning and SeedSelect example workflows through a
real ComfyUI server (marker ``comfyui``; skipped without COMFYUI_PATH), as the browser drives it:
each UI-format file is converted with the server's own ``/object_info`` (every ``widgets_values``
entry used, each value of the type its input takes), made tiny (the tiny SD1 checkpoint, 64 px,
one or two steps) and queued on ``/prompt``; the tests check the history status, the node outputs,
the files written and the server log.

    COMFYUI_PATH=~/.cache/likeness/ComfyUI python -m pytest -m comfyui tests/test_comfy_workflows_more.py

One server serves every test.  Test-only custom nodes (``likeness_test_more.py`` in the server's
``custom_nodes``) add a conditioning digest and a latent comparison, and teach ComfyUI's CLIP
vision loader a tiny model: its detection knows only full-size encoders (ViT-L and up, hundreds of
MB and far too slow for a CPU test), so ``Load CLIP Vision`` loads ``tiny_clip_vision.safetensors``
(2 layers of width 32, random weights; created by the module at start-up) through the shim and
every other file as before.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from pathlib import Path

import pytest

import comfy_env

pytestmark = pytest.mark.comfyui

REPO = comfy_env.REPO
WORKFLOWS = REPO / "example_workflows"
NAMES = ("dreambooth_lora", "dreambooth_full", "pivotal_tuning", "seedselect")
FOLDER = "likeness_example"  # the DreamBooth examples' image folder
REF_FOLDER = "likeness_seedselect"  # the SeedSelect example's reference folder
TINY_CKPT = "tiny_sd15.safetensors"
TINY_CV = "tiny_clip_vision.safetensors"

LORA_WARNING = re.compile(r"(?i)lora key not loaded")
EMBEDDING_WARNING = comfy_env.EMBEDDING_WARNING

TEST_NODES = '''
import hashlib
import json
import os

import torch

import comfy.clip_vision
import folder_paths
import safetensors.torch


class LikenessTestMoreCondProbe:
    """A digest of a CONDITIONING, shown in /history."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}
    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def probe(self, conditioning):
        t = conditioning[0][0].detach().float().cpu().contiguous()
        return {"ui": {"digest": [hashlib.sha256(t.numpy().tobytes()).hexdigest()]}}


class LikenessTestMoreLatentDiff:
    """max |a - b| and max |b| of two LATENTs, shown in /history."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("LATENT",), "b": ("LATENT",)}}
    RETURN_TYPES = ()
    FUNCTION = "diff"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def diff(self, a, b):
        x, y = a["samples"].detach().float().cpu(), b["samples"].detach().float().cpu()
        same = x.shape == y.shape
        return {"ui": {"shapes": [list(x.shape), list(y.shape)],
                       "max_abs_diff": [float((x - y).abs().max()) if same else float("inf")],
                       "max_abs": [float(y.abs().max())]}}


# ---- a tiny CLIP vision model for Load CLIP Vision --------------------------------------------------
_CFG = {"hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64,
        "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 4, "num_channels": 3,
        "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 16}
_CFG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "likeness_tiny_clip_vision.json")
with open(_CFG_PATH, "w") as f:
    json.dump(_CFG, f)
_KEY = "vision_model.encoder.layers.{}.layer_norm1.weight"
_original = comfy.clip_vision.load_clipvision_from_sd


def _tiny_aware(sd, prefix="", convert_keys=False):
    if (not convert_keys and _KEY.format(0) in sd and sd[_KEY.format(0)].shape[0] == _CFG["hidden_size"]
            and _KEY.format(_CFG["num_hidden_layers"]) not in sd):
        clip = comfy.clip_vision.ClipVisionModel(_CFG_PATH)
        clip.load_sd(sd)
        return clip
    return _original(sd, prefix, convert_keys)


comfy.clip_vision.load_clipvision_from_sd = _tiny_aware
_out = os.path.join(folder_paths.get_folder_paths("clip_vision")[0], "''' + TINY_CV + '''")
if not os.path.exists(_out):
    with torch.inference_mode():
        _cv = comfy.clip_vision.ClipVisionModel(_CFG_PATH)
        _g = torch.Generator().manual_seed(0)
        _sd = {k: (torch.ones(v.shape) if "norm" in k and k.endswith("weight") else
                   0.1 * torch.randn(v.shape, generator=_g)).float().contiguous()
               for k, v in _cv.model.state_dict().items()}
    os.makedirs(os.path.dirname(_out), exist_ok=True)
    safetensors.torch.save_file(_sd, _out)

NODE_CLASS_MAPPINGS = {"LikenessTestMoreCondProbe": LikenessTestMoreCondProbe,
                       "LikenessTestMoreLatentDiff": LikenessTestMoreLatentDiff}
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = comfy_env.comfy_path()
    if root is None:
        pytest.skip("COMFYUI_PATH not set: these tests start a ComfyUI server from a checkout "
                    "(e.g. COMFYUI_PATH=~/.cache/likeness/ComfyUI)")
    ckpt = comfy_env.ensure_tiny_checkpoint("sd15", root)
    base = tmp_path_factory.mktemp("comfy_base_more")
    (base / "custom_nodes").mkdir()
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "clip_vision").mkdir(parents=True)
    comfy_env.link(REPO, base / "custom_nodes" / "likeness")
    (base / "custom_nodes" / "likeness_test_more.py").write_text(TEST_NODES, encoding="utf-8")
    comfy_env.link(ckpt, base / "models" / "checkpoints" / ckpt.name)
    comfy_env.write_disc_images(base / "input" / FOLDER, 2, seed=len(FOLDER))
    comfy_env.write_disc_images(base / "input" / REF_FOLDER, 3, seed=len(REF_FOLDER))
    srv = comfy_env.ComfyServer(root, base)
    try:
        srv.start()
        srv.object_info = srv.get("/object_info")
        yield srv
    finally:
        srv.stop()


# ---- helpers ---------------------------------------------------------------------------------------

def _workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def _check_widget_types(prompt: dict, object_info: dict) -> None:
    """Every widget value is of its input's type (a misplaced widgets_values entry shows up here
    even where /prompt would silently convert it); combos other than file lists hold an option."""
    for nid, node in prompt.items():
        info = object_info[node["class_type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link
                continue
            kind = specs[name][0]
            where = f"node {nid} ({node['class_type']}) input {name!r} = {value!r}"
            if isinstance(kind, list) or kind == "COMBO":
                options = kind if isinstance(kind, list) else specs[name][1].get("options", [])
                files = name.endswith("_name")  # model files: the tests pick the tiny ones
                assert isinstance(value, str) and (files or value in options), where
            elif kind == "INT":
                assert isinstance(value, int) and not isinstance(value, bool), where
            elif kind == "FLOAT":
                assert isinstance(value, (int, float)) and not isinstance(value, bool), where
            elif kind == "BOOLEAN":
                assert isinstance(value, bool), where
            elif kind == "STRING":
                assert isinstance(value, str), where


def _find(prompt: dict, class_type: str, where=lambda node: True) -> str:
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type and where(v)]
    assert len(ids) == 1, f"expected one {class_type}, found {ids}"
    return ids[0]


def _api(server, name: str) -> dict:
    """The workflow in API format, converted as the frontend does, every widget type-checked."""
    p = comfy_env.ui_to_api(_workflow(name), server.object_info)
    _check_widget_types(p, server.object_info)
    ck = _find(p, "CheckpointLoaderSimple")
    assert p[ck]["inputs"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
    p[ck]["inputs"]["ckpt_name"] = TINY_CKPT
    folder = _find(p, "LikenessLoadImageFolder")
    assert p[folder]["inputs"]["resolution"] == 512
    p[folder]["inputs"]["resolution"] = 64
    return p


def _run(server, prompt: dict) -> tuple[dict, str, float]:
    """Queue, wait; (history entry, what the server logged meanwhile, seconds)."""
    start = len(server.log_text())
    t0 = time.perf_counter()
    entry = server.wait(server.queue(prompt, f"likeness-test-{uuid.uuid4().hex[:8]}"), timeout=900)
    seconds = time.perf_counter() - t0
    log = server.log_text()[start:]
    errors = comfy_env.history_messages(entry, "execution_error")
    assert entry["status"]["status_str"] == "success", f"{errors}\n{server.log_tail()}"
    return entry, log, seconds


def _saved_image(server, entry: dict, save_id: str) -> Path:
    img = entry["outputs"][save_id]["images"][0]
    path = server.base / "output" / img["subfolder"] / img["filename"]
    assert path.is_file(), path
    return path


def _warnings(log: str, pattern: re.Pattern) -> list[str]:
    return [ln for ln in log.splitlines() if pattern.search(ln)]


def _make_sampling_tiny(p: dict, sampler_id: str) -> None:
    """The KSampler at 1 step on a 64x64 latent."""
    p[sampler_id]["inputs"]["steps"] = 1
    lat = p[sampler_id]["inputs"]["latent_image"][0]
    assert p[lat]["class_type"] == "EmptyLatentImage"
    p[lat]["inputs"].update(width=64, height=64)


def _use_later(server, text: str, lora: str | None = None, ckpt: str = TINY_CKPT) -> tuple[str, str]:
    """A later workflow using the written files, as the notes describe: Load Checkpoint (+ Load LoRA)
    -> CLIPTextEncode -> probe.  Returns (what the server logged, the conditioning's digest)."""
    p = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    clip = ["1", 1]
    if lora:
        p["2"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                          "strength_model": 1.0, "strength_clip": 1.0}}
        clip = ["2", 1]
    p["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip}}
    p["4"] = {"class_type": "LikenessTestMoreCondProbe", "inputs": {"conditioning": ["3", 0]}}
    entry, log, _ = _run(server, p)
    assert not {"2", "3"} & comfy_env.cached_nodes(entry)  # the files were really loaded and used now
    return log, entry["outputs"]["4"]["digest"][0]


def _lora_keys(path: Path) -> list[str]:
    import safetensors

    with safetensors.safe_open(str(path), "pt") as f:
        return list(f.keys())


# ---- the files themselves (no server needed) -------------------------------------------------------

def test_workflow_files_are_consistent_ui_json():
    for name in NAMES:
        wf = _workflow(name)
        nodes = {n["id"]: n for n in wf["nodes"]}
        assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] == max(nodes), name
        assert wf["last_link_id"] == max(l[0] for l in wf["links"]), name
        assert any(n["type"] == "MarkdownNote" and n["widgets_values"][0].startswith("## ") for n in wf["nodes"])
        for lid, src, sslot, dst, dslot, kind in wf["links"]:  # both ends know the link, with the same type
            out, inp = nodes[src]["outputs"][sslot], nodes[dst]["inputs"][dslot]
            assert lid in out["links"] and inp["link"] == lid and out["type"] == kind, (name, lid)
        for n in wf["nodes"]:
            for i in n.get("inputs", []):
                assert i["link"] is None or any(l[0] == i["link"] and l[3] == n["id"] for l in wf["links"])
            for o in n.get("outputs", []):
                for lid in o.get("links") or []:
                    assert any(l[0] == lid and l[1] == n["id"] for l in wf["links"]), (name, n["id"], lid)


def test_templates_are_served(server):
    listed = server.get("/workflow_templates").get("likeness", [])
    assert set(NAMES) <= set(listed), listed
    for name in NAMES:
        status, body = server.request("GET", f"/api/workflow_templates/likeness/{name}.json")
        assert status == 200 and json.loads(body) == _workflow(name)


# ---- the workflows through /prompt ---------------------------------------------------------------

def test_dreambooth_lora_with_class_images_from_the_sampler(server):
    p = _api(server, "dreambooth_lora")
    tr = _find(p, "LikenessTrainDreamBoothLoRA")
    t = p[tr]["inputs"]
    assert t["name"] == "likeness_dreambooth" and t["instance_prompt"] == "a photo of sks dog"
    assert t["seed"] == 0 and t["overwrite"] is True and t["targets"] == "attention" and t["captions"] == ""
    # class prompt and class images come from the graph: PrimitiveString -> CLIPTextEncode -> KSampler
    # -> VAEDecode -> class_images, the same text into class_prompt
    prim = t["class_prompt"][0]
    assert p[prim]["class_type"] == "PrimitiveString" and p[prim]["inputs"]["value"] == "a photo of a dog"
    dec = t["class_images"][0]
    assert p[dec]["class_type"] == "VAEDecode"
    cks = p[dec]["inputs"]["samples"][0]
    assert p[cks]["class_type"] == "KSampler" and p[cks]["inputs"]["model"] == [_find(p, "CheckpointLoaderSimple"), 0]
    cpos = p[cks]["inputs"]["positive"][0]
    assert p[cpos]["inputs"]["text"] == [prim, 0]
    clat = p[cks]["inputs"]["latent_image"][0]
    assert p[clat]["inputs"]["batch_size"] == 8
    final = _find(p, "KSampler", lambda n: n["inputs"]["model"] == [tr, 0])
    pos = p[final]["inputs"]["positive"][0]
    assert p[pos]["inputs"]["clip"] == [tr, 1] and "sks dog" in p[pos]["inputs"]["text"]
    loss = _find(p, "LossGraphNode")
    assert p[loss]["inputs"]["loss"] == [tr, 4]

    _make_sampling_tiny(p, cks)
    p[clat]["inputs"]["batch_size"] = 2
    _make_sampling_tiny(p, final)
    t.update(steps=2, preview_every=0)
    entry, log, seconds = _run(server, p)
    print(f"\ndreambooth_lora: {seconds:.1f} s")
    lora = server.base / "models" / "loras" / "likeness_dreambooth.safetensors"
    assert lora.is_file(), sorted(os.listdir(lora.parent))
    keys = _lora_keys(lora)
    assert keys and all(k.startswith("lora_unet_") for k in keys), keys[:5]  # kohya names, no text encoder
    text = entry["outputs"][tr]["text"][0]
    assert "2 steps" in text and "2 class images" in text, text
    _saved_image(server, entry, _find(p, "SaveImage"))
    assert entry["outputs"][loss]["images"]
    assert entry["outputs"][_find(p, "PreviewImage")]["images"]  # the class images are shown
    assert not _warnings(log, LORA_WARNING), _warnings(log, LORA_WARNING)
    # ... and the file loads through Load LoRA in a later workflow, every key used
    log, _ = _use_later(server, "a photo of sks dog", lora=lora.name)
    assert not _warnings(log, LORA_WARNING), log


def test_dreambooth_full_samples_its_own_class_images(server):
    p = _api(server, "dreambooth_full")
    tr = _find(p, "LikenessTrainDreamBoothFull")
    t = p[tr]["inputs"]
    assert "class_images" not in t and t["num_class_images"] > 0 and t["class_prompt"] == "a photo of a dog"
    assert t["optimizer"] == "adafactor" and t["extract_lora_rank"] == 0 and t["overwrite"] is True
    final = _find(p, "KSampler")
    assert p[final]["inputs"]["model"] == [tr, 0]
    assert p[p[final]["inputs"]["positive"][0]]["inputs"]["clip"] == [tr, 1]
    loss = _find(p, "LossGraphNode")
    assert p[loss]["inputs"]["loss"] == [tr, 4]

    _make_sampling_tiny(p, final)
    t.update(steps=2, num_class_images=1, preview_every=0)
    entry, log, seconds = _run(server, p)
    print(f"\ndreambooth_full: {seconds:.1f} s")
    ckpt = server.base / "models" / "checkpoints" / "likeness_dreambooth_full.safetensors"
    assert ckpt.is_file(), sorted(os.listdir(ckpt.parent))
    text = entry["outputs"][tr]["text"][0]
    assert "2 steps" in text and "1 class images" in text, text
    _saved_image(server, entry, _find(p, "SaveImage"))
    assert entry["outputs"][loss]["images"]
    # ... and the checkpoint loads through Load Checkpoint in a later workflow
    _use_later(server, "a photo of sks dog", ckpt=ckpt.name)


def test_pivotal_tuning_word_in_the_prompt(server):
    p = _api(server, "pivotal_tuning")
    tr = _find(p, "LikenessTrainPivotal")
    t = p[tr]["inputs"]
    assert t["token"] == "sks_lk" and t["token"] in t["instance_prompt"] and t["name"] == "likeness_pivotal"
    assert t["targets"] == "attention" and t["bundle_embedding"] is False and t["captions"] == ""
    rep = _find(p, "StringReplace")
    assert p[rep]["inputs"]["replace"] == [tr, 2]  # the 'embedding:<token>' output spliced into the prompt
    pos = _find(p, "CLIPTextEncode", lambda n: n["inputs"]["text"] == [rep, 0])
    assert p[pos]["inputs"]["clip"] == [tr, 1]
    final = _find(p, "KSampler")
    assert p[final]["inputs"]["model"] == [tr, 0] and p[final]["inputs"]["positive"] == [pos, 0]
    loss = _find(p, "LossGraphNode")
    assert p[loss]["inputs"]["loss"] == [tr, 5]

    _make_sampling_tiny(p, final)
    t.update(steps=2, num_class_images=1, preview_every=0)
    plain = p[rep]["inputs"]["string"].replace(p[rep]["inputs"]["find"], "").replace("  ", " ")
    p["900"] = {"class_type": "LikenessTestMoreCondProbe", "inputs": {"conditioning": [pos, 0]}}
    p["901"] = {"class_type": "CLIPTextEncode", "inputs": {"text": plain, "clip": [tr, 1]}}
    p["902"] = {"class_type": "LikenessTestMoreCondProbe", "inputs": {"conditioning": ["901", 0]}}
    entry, log, seconds = _run(server, p)
    print(f"\npivotal_tuning: {seconds:.1f} s")
    models = server.base / "models"
    assert (models / "loras" / "likeness_pivotal.safetensors").is_file(), sorted(os.listdir(models / "loras"))
    assert (models / "embeddings" / "sks_lk.safetensors").is_file(), sorted(os.listdir(models / "embeddings"))
    out = entry["outputs"]
    assert "embedding:sks_lk" in out[tr]["text"][0]
    _saved_image(server, entry, _find(p, "SaveImage"))
    assert out[loss]["images"]
    # the word changes the conditioning the sampler gets: ComfyUI found and used the embedding
    assert out["900"]["digest"] != out["902"]["digest"]
    assert not _warnings(log, EMBEDDING_WARNING), _warnings(log, EMBEDDING_WARNING)
    assert not _warnings(log, LORA_WARNING), _warnings(log, LORA_WARNING)
    # a later workflow (Load LoRA + embedding:sks_lk in the prompt, as the note says) encodes the
    # prompt exactly as the trainer's CLIP output did
    text = p[rep]["inputs"]["string"].replace(p[rep]["inputs"]["find"], "embedding:sks_lk")
    log, digest = _use_later(server, text, lora="likeness_pivotal.safetensors")
    assert digest == out["900"]["digest"][0]
    assert not _warnings(log, EMBEDDING_WARNING) and not _warnings(log, LORA_WARNING), log


def test_seedselect_noise_through_sampler_custom_advanced(server):
    p = _api(server, "seedselect")
    ss = _find(p, "LikenessSeedSelect")
    s = p[ss]["inputs"]
    sca = _find(p, "SamplerCustomAdvanced")
    a = p[sca]["inputs"]
    assert a["noise"] == [ss, 0]
    # the sampling SeedSelect optimised through is the one SamplerCustomAdvanced runs
    sch = a["sigmas"][0]
    assert p[sch]["class_type"] == "BasicScheduler" and s["sigmas"] == [sch, 0]
    assert p[sch]["inputs"]["scheduler"] == s["scheduler"] and p[sch]["inputs"]["steps"] == s["steps"]
    assert p[sch]["inputs"]["denoise"] == 1.0
    assert p[a["sampler"][0]]["inputs"]["sampler_name"] == s["sampler"]
    guider = p[a["guider"][0]]["inputs"]
    assert guider["cfg"] == s["cfg"] and guider["positive"] == s["positive"] and guider["negative"] == s["negative"]
    assert guider["model"] == s["model"] == p[sch]["inputs"]["model"]
    lat = p[a["latent_image"][0]]["inputs"]
    assert (lat["width"], lat["height"], lat["batch_size"]) == (s["width"], s["height"], s["num_seeds"])
    assert s["save_as"] == "likeness_seedselect" and s["seed"] == 0 and s["start"] == "seed"
    cv = s["clip_vision"][0]
    assert p[cv]["class_type"] == "CLIPVisionLoader"
    loss = _find(p, "LossGraphNode")
    assert p[loss]["inputs"]["loss"] == [ss, 4]

    assert TINY_CV in server.object_info["CLIPVisionLoader"]["input"]["required"]["clip_name"][0]
    p[cv]["inputs"]["clip_name"] = TINY_CV
    s.update(width=64, height=64, steps=3, iterations=2)
    p[sch]["inputs"]["steps"] = 3
    lat.update(width=64, height=64)
    p["900"] = {"class_type": "LikenessTestMoreLatentDiff", "inputs": {"a": [sca, 0], "b": [ss, 2]}}
    entry, log, seconds = _run(server, p)
    print(f"\nseedselect: {seconds:.1f} s")
    out = entry["outputs"]
    seed_file = server.base / "models" / "likeness_seeds" / "likeness_seedselect.seed.safetensors"
    assert seed_file.is_file()
    assert "2 iterations" in out[ss]["text"][0], out[ss]["text"]
    _saved_image(server, entry, _find(p, "SaveImage"))
    assert out[loss]["images"]
    # SamplerCustomAdvanced with the node's NOISE reproduces the node's own result
    d = out["900"]
    assert d["shapes"][0] == d["shapes"][1] == [1, 4, 8, 8], d
    assert math.isfinite(d["max_abs"][0]) and d["max_abs"][0] > 0, d
    assert d["max_abs_diff"][0] <= 1e-4 * d["max_abs"][0] + 1e-5, d
