"""The DreamBooth LoRA, full DreamBooth, pivotal tuning and SeedSelect example workflows through a
real ComfyUI server (marker ``comfyui``; skipped without COMFYUI_PATH), as the browser drives it:
each UI-format file is converted with the server's own ``/object_info`` (every ``widgets_values``
entry used, each value of the type its input takes), made tiny (the tiny SD1 checkpoint, 64 px,
one or two steps) and queued on ``/prompt``; the tests check the history status, the node outputs,
the files written and the server log.

    COMFYUI_PATH=~/.cache/likeness/ComfyUI python -m pytest -m comfyui tests/test_comfy_workflows_more.py

One server serves every test.  Test-only custom nodes (tests/support/server_nodes.py in the
server's ``custom_nodes``) add a conditioning digest and a latent comparison, and teach ComfyUI's
CLIP vision loader a tiny model: its detection knows only full-size encoders (ViT-L and up,
hundreds of MB and far too slow for a CPU test), so ``Load CLIP Vision`` loads
``tiny_clip_vision.safetensors`` (2 layers of width 32, random weights; written at start-up)
through the shim and every other file as before.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from support import tiny_checkpoints
from support.comfy_runtime import REPO
from support.comfy_server import (EMBEDDING_WARNING, LORA_WARNING, cached_nodes, matching_lines, run_prompt,
                                  started_server)
from support.tiny_clip_vision import FILE as TINY_CV
from support.workflows import add_trigger_probes, check_widget_types, find_node, ui_to_api

pytestmark = pytest.mark.comfyui

WORKFLOWS = REPO / "example_workflows"
NAMES = ("dreambooth_lora", "dreambooth_full", "pivotal_tuning", "seedselect", "train_and_evaluate")
FOLDER = "likeness_example"  # the DreamBooth examples' image folder
REF_FOLDER = "likeness_seedselect"  # the SeedSelect example's reference folder
TINY_CKPT = tiny_checkpoints.CHECKPOINTS["sd15"]


@pytest.fixture(scope="module")
def server(comfy_checkout, tmp_path_factory):
    ckpt = tiny_checkpoints.ensure_tiny_checkpoint("sd15")
    folders = {FOLDER: {"n": 2, "seed": len(FOLDER)}, REF_FOLDER: {"n": 3, "seed": len(REF_FOLDER)}}
    with started_server(comfy_checkout, tmp_path_factory.mktemp("comfy_base_more"), ckpt, folders) as srv:
        yield srv


# ---- helpers ---------------------------------------------------------------------------------------

def _workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def _api(server, name: str) -> dict:
    """The workflow in API format, converted as the frontend does, every widget type-checked."""
    p = ui_to_api(_workflow(name), server.object_info)
    check_widget_types(p, server.object_info)
    ck = find_node(p, "CheckpointLoaderSimple")
    assert p[ck]["inputs"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
    p[ck]["inputs"]["ckpt_name"] = TINY_CKPT
    folder = find_node(p, "LikenessLoadImageFolder")
    assert p[folder]["inputs"]["resolution"] == 512
    p[folder]["inputs"]["resolution"] = 64
    return p


def _run(server, prompt: dict) -> tuple[dict, str, float]:
    """Queue, wait; (history entry, what the server logged meanwhile, seconds)."""
    entry, _, log, seconds = run_prompt(server, prompt, timeout=900)
    return entry, log, seconds


def _saved_image(server, entry: dict, save_id: str) -> Path:
    img = entry["outputs"][save_id]["images"][0]
    path = server.base / "output" / img["subfolder"] / img["filename"]
    assert path.is_file(), path
    return path


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
    p["4"] = {"class_type": "LikenessTestCondProbe", "inputs": {"conditioning": ["3", 0]}}
    entry, log, _ = _run(server, p)
    assert not {"2", "3"} & cached_nodes(entry)  # the files were really loaded and used now
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
    tr = find_node(p, "LikenessTrainDreamBoothLoRA")
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
    assert p[cks]["class_type"] == "KSampler" and p[cks]["inputs"]["model"] == [find_node(p, "CheckpointLoaderSimple"), 0]
    cpos = p[cks]["inputs"]["positive"][0]
    assert p[cpos]["inputs"]["text"] == [prim, 0]
    clat = p[cks]["inputs"]["latent_image"][0]
    assert p[clat]["inputs"]["batch_size"] == 8
    final = find_node(p, "KSampler", lambda n: n["inputs"]["model"] == [tr, 0])
    pos = p[final]["inputs"]["positive"][0]
    assert p[pos]["inputs"]["clip"] == [tr, 1] and "sks dog" in p[pos]["inputs"]["text"]
    loss = find_node(p, "LossGraphNode")
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
    _saved_image(server, entry, find_node(p, "SaveImage"))
    assert entry["outputs"][loss]["images"]
    assert entry["outputs"][find_node(p, "PreviewImage")]["images"]  # the class images are shown
    assert not matching_lines(log, LORA_WARNING), matching_lines(log, LORA_WARNING)
    # ... and the file loads through Load LoRA in a later workflow, every key used
    log, _ = _use_later(server, "a photo of sks dog", lora=lora.name)
    assert not matching_lines(log, LORA_WARNING), log


def test_dreambooth_full_samples_its_own_class_images(server):
    p = _api(server, "dreambooth_full")
    tr = find_node(p, "LikenessTrainDreamBoothFull")
    t = p[tr]["inputs"]
    assert "class_images" not in t and t["num_class_images"] > 0 and t["class_prompt"] == "a photo of a dog"
    assert t["optimizer"] == "adafactor" and t["extract_lora_rank"] == 0 and t["overwrite"] is True
    final = find_node(p, "KSampler")
    assert p[final]["inputs"]["model"] == [tr, 0]
    assert p[p[final]["inputs"]["positive"][0]]["inputs"]["clip"] == [tr, 1]
    loss = find_node(p, "LossGraphNode")
    assert p[loss]["inputs"]["loss"] == [tr, 4]

    _make_sampling_tiny(p, final)
    t.update(steps=2, num_class_images=1, preview_every=0)
    entry, log, seconds = _run(server, p)
    print(f"\ndreambooth_full: {seconds:.1f} s")
    ckpt = server.base / "models" / "checkpoints" / "likeness_dreambooth_full.safetensors"
    assert ckpt.is_file(), sorted(os.listdir(ckpt.parent))
    text = entry["outputs"][tr]["text"][0]
    assert "2 steps" in text and "1 class images" in text, text
    _saved_image(server, entry, find_node(p, "SaveImage"))
    assert entry["outputs"][loss]["images"]
    # ... and the checkpoint loads through Load Checkpoint in a later workflow
    _use_later(server, "a photo of sks dog", ckpt=ckpt.name)


def test_pivotal_tuning_word_in_the_prompt(server):
    p = _api(server, "pivotal_tuning")
    tr = find_node(p, "LikenessTrainPivotal")
    t = p[tr]["inputs"]
    assert t["token"] == "sks_lk" and t["token"] in t["instance_prompt"] and t["name"] == "likeness_pivotal"
    assert t["targets"] == "attention" and t["bundle_embedding"] is False and t["captions"] == ""
    rep = find_node(p, "StringReplace")
    assert p[rep]["inputs"]["replace"] == [tr, 2]  # the 'embedding:<token>' output spliced into the prompt
    pos = find_node(p, "CLIPTextEncode", lambda n: n["inputs"]["text"] == [rep, 0])
    assert p[pos]["inputs"]["clip"] == [tr, 1]
    final = find_node(p, "KSampler")
    assert p[final]["inputs"]["model"] == [tr, 0] and p[final]["inputs"]["positive"] == [pos, 0]
    loss = find_node(p, "LossGraphNode")
    assert p[loss]["inputs"]["loss"] == [tr, 5]

    _make_sampling_tiny(p, final)
    t.update(steps=2, num_class_images=1, preview_every=0)
    assert add_trigger_probes(p, rep, pos, [tr, 1]) == ("900", "902")
    entry, log, seconds = _run(server, p)
    print(f"\npivotal_tuning: {seconds:.1f} s")
    models = server.base / "models"
    assert (models / "loras" / "likeness_pivotal.safetensors").is_file(), sorted(os.listdir(models / "loras"))
    assert (models / "embeddings" / "sks_lk.safetensors").is_file(), sorted(os.listdir(models / "embeddings"))
    out = entry["outputs"]
    assert "embedding:sks_lk" in out[tr]["text"][0]
    _saved_image(server, entry, find_node(p, "SaveImage"))
    assert out[loss]["images"]
    # the word changes the conditioning the sampler gets: ComfyUI found and used the embedding
    assert out["900"]["digest"] != out["902"]["digest"]
    assert not matching_lines(log, EMBEDDING_WARNING), matching_lines(log, EMBEDDING_WARNING)
    assert not matching_lines(log, LORA_WARNING), matching_lines(log, LORA_WARNING)
    # a later workflow (Load LoRA + embedding:sks_lk in the prompt, as the note says) encodes the
    # prompt exactly as the trainer's CLIP output did
    text = p[rep]["inputs"]["string"].replace(p[rep]["inputs"]["find"], "embedding:sks_lk")
    log, digest = _use_later(server, text, lora="likeness_pivotal.safetensors")
    assert digest == out["900"]["digest"][0]
    assert not matching_lines(log, EMBEDDING_WARNING) and not matching_lines(log, LORA_WARNING), log


def test_seedselect_noise_through_sampler_custom_advanced(server):
    p = _api(server, "seedselect")
    ss = find_node(p, "LikenessSeedSelect")
    s = p[ss]["inputs"]
    sca = find_node(p, "SamplerCustomAdvanced")
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
    loss = find_node(p, "LossGraphNode")
    assert p[loss]["inputs"]["loss"] == [ss, 4]

    assert TINY_CV in server.object_info["CLIPVisionLoader"]["input"]["required"]["clip_name"][0]
    p[cv]["inputs"]["clip_name"] = TINY_CV
    s.update(width=64, height=64, steps=3, iterations=2)
    p[sch]["inputs"]["steps"] = 3
    lat.update(width=64, height=64)
    p["900"] = {"class_type": "LikenessTestLatentDiff", "inputs": {"a": [sca, 0], "b": [ss, 2]}}
    entry, log, seconds = _run(server, p)
    print(f"\nseedselect: {seconds:.1f} s")
    out = entry["outputs"]
    seed_file = server.base / "models" / "likeness_seeds" / "likeness_seedselect.seed.safetensors"
    assert seed_file.is_file()
    assert "2 iterations" in out[ss]["text"][0], out[ss]["text"]
    _saved_image(server, entry, find_node(p, "SaveImage"))
    assert out[loss]["images"]
    # SamplerCustomAdvanced with the node's NOISE reproduces the node's own result
    d = out["900"]
    assert d["shapes"][0] == d["shapes"][1] == [1, 4, 8, 8], d
    assert math.isfinite(d["max_abs"][0]) and d["max_abs"][0] > 0, d
    assert d["max_abs_diff"][0] <= 1e-4 * d["max_abs"][0] + 1e-5, d


def _lora_branch(p: dict, sampler_id: str, lora: str, first_id: int) -> str:
    """Beside the workflow: Load LoRA (``lora``) on the checkpoint -> the same prompts, latent and
    settings into a second KSampler; returns its id (nodes from ``first_id`` on)."""
    ks = p[sampler_id]["inputs"]
    ck = find_node(p, "CheckpointLoaderSimple")
    ids = [str(first_id + k) for k in range(4)]
    p[ids[0]] = {"class_type": "LoraLoader", "inputs": {"model": [ck, 0], "clip": [ck, 1], "lora_name": lora,
                                                         "strength_model": 1.0, "strength_clip": 1.0}}
    for nid, which in ((ids[1], "positive"), (ids[2], "negative")):
        p[nid] = {"class_type": "CLIPTextEncode",
                  "inputs": {"text": p[ks[which][0]]["inputs"]["text"], "clip": [ids[0], 1]}}
    p[ids[3]] = {"class_type": "KSampler", "inputs": {**ks, "model": [ids[0], 0], "positive": [ids[1], 0],
                                                       "negative": [ids[2], 0]}}
    return ids[3]


def test_train_and_evaluate_keeps_the_best_lora_and_samples_with_it(server):
    p = _api(server, "train_and_evaluate")
    tr = find_node(p, "LikenessTrainDreamBoothLoRA")
    t = p[tr]["inputs"]
    assert t["name"] == "likeness_best" and t["eval_every"] == 50 and t["output"] == "best"
    cv = t["clip_vision"][0]
    assert p[cv]["class_type"] == "CLIPVisionLoader"
    final = find_node(p, "KSampler")
    assert p[final]["inputs"]["model"] == [tr, 0]
    assert p[p[final]["inputs"]["positive"][0]]["inputs"]["clip"] == [tr, 1]
    curves_save = find_node(p, "SaveImage", lambda n: n["inputs"]["images"] == [tr, 5])
    assert p[curves_save]["inputs"]["filename_prefix"] == "likeness_best_curves"

    # CPU-sized: 3 steps at a learning rate that changes the tiny model, evaluated at every step
    # (each evaluation samples the 4 default prompts), 1 sampler step on a 64 px latent
    p[cv]["inputs"]["clip_name"] = TINY_CV
    t.update(steps=3, eval_every=1, preview_every=0, save_every=0, learning_rate=1e-2)
    _make_sampling_tiny(p, final)
    entry, log, seconds = _run(server, p)
    print(f"\ntrain_and_evaluate: {seconds:.1f} s")
    loras = server.base / "models" / "loras"
    assert (loras / "likeness_best.best.safetensors").is_file(), sorted(os.listdir(loras))
    assert (loras / "likeness_best.safetensors").is_file()
    text = entry["outputs"][tr]["text"][0]
    assert "best step" in text, text
    curves = _saved_image(server, entry, curves_save)
    from PIL import Image

    assert Image.open(curves).size == (640, 320)
    _saved_image(server, entry, find_node(p, "SaveImage", lambda n: n["inputs"]["filename_prefix"] == "likeness_best"))
    # the sampler drew with the best LoRA: the same prompt through Load LoRA of the .best file gives
    # the same latent (the file is fp16, hence the tolerance), and the last step's file does not
    best = _lora_branch(p, final, "likeness_best.best.safetensors", 910)
    last = _lora_branch(p, final, "likeness_best.safetensors", 920)
    p["930"] = {"class_type": "LikenessTestLatentDiff", "inputs": {"a": [best, 0], "b": [final, 0]}}
    p["931"] = {"class_type": "LikenessTestLatentDiff", "inputs": {"a": [last, 0], "b": [final, 0]}}
    entry, log, _ = _run(server, p)
    assert tr in cached_nodes(entry)  # the same run, not a second training
    to_best, to_last = entry["outputs"]["930"], entry["outputs"]["931"]
    print(f"latent differences: to the .best file's {to_best['max_abs_diff'][0]:.2e}, to the last's "
          f"{to_last['max_abs_diff'][0]:.2e} (max |latent| {to_best['max_abs'][0]:.2f})")
    assert to_best["max_abs_diff"][0] <= 1e-3 * to_best["max_abs"][0] + 1e-4, to_best
    if "best step 3" not in text:
        assert to_last["max_abs_diff"][0] > 10 * to_best["max_abs_diff"][0], (to_best, to_last)
