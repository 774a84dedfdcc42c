"""Evaluate (Likeness) inside a real ComfyUI (marker ``comfyui``; skipped without COMFYUI_PATH):
CLIP_VISION models built by ComfyUI's own loader class (a tiny CLIP vision model and a tiny
DINOv2), the node run as ComfyUI runs it, its numbers against the embeddings ComfyUI's own
``encode_image`` gives.

    COMFYUI_PATH=~/.cache/likeness/ComfyUI python -m pytest -m comfyui tests/test_comfy_evaluate.py
"""
from __future__ import annotations

import json

import pytest
import torch

from support import tiny_clip_vision

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfy_root")]
torch.set_num_threads(1)

#: a two-layer DINOv2 of width 32; ComfyUI's DINOv2 always takes 518 px inputs (14 px patches)
TINY_DINO = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "layer_norm_eps": 1e-6,
             "use_swiglu_ffn": False, "model_type": "dinov2", "image_size": 518, "patch_size": 14,
             "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def vision(comfy_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cv")
    clip = tiny_clip_vision.random_model(tiny_clip_vision.write_config(folder / "tiny_clip_vision.json"))
    (folder / "tiny_dino.json").write_text(json.dumps(TINY_DINO), encoding="utf-8")
    return clip, tiny_clip_vision.random_model(folder / "tiny_dino.json", seed=1)


def _run(node_cls, **inputs):
    clone = node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": {}})
    with torch.inference_mode():
        return clone.EXECUTE_NORMALIZED(**inputs)


def _images(n, seed):
    """8-bit-exact images at the tiny CLIP's input size, so ComfyUI's preprocessing is ours exactly."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 32, 32, 3), generator=g) / 255.0).float()


def test_node_scores_with_comfyuis_own_embeddings(likeness_nodes, vision):
    from likeness.trainers import metrics as M

    clip, dino = vision
    refs, gen = _images(3, 0), _images(4, 1)
    out = _run(likeness_nodes["LikenessEvaluate"], references=refs, images=gen, clip_vision=clip,
               prompts="a photo of sks dog", word="sks", class_noun="dog", dino=dino)
    text, picture = out.result[0], out.result[1]
    rows = [ln.split() for ln in text.splitlines()]
    assert rows[0] == ["image", "CLIP-I", "DINO", "CLIP-T", "diversity", "combined"] and rows[5][0] == "all"
    with torch.inference_mode():
        c_gen, c_ref = clip.encode_image(gen)["image_embeds"], clip.encode_image(refs)["image_embeds"]
        d_gen, d_ref = dino.encode_image(gen)["image_embeds"], dino.encode_image(refs)["image_embeds"]
    want_i = M.subject_similarity(c_gen, c_ref)
    want_d = M.subject_similarity(d_gen, d_ref)
    got_i = torch.tensor([float(r[1]) for r in rows[1:5]])
    got_d = torch.tensor([float(r[2]) for r in rows[1:5]])
    assert torch.allclose(got_i, want_i, atol=2e-4)  # identical preprocessing: only the table's rounding
    assert torch.allclose(got_d, want_d, atol=1e-2)  # 32 -> 518 px upscale: ComfyUI rounds to 8 bits after it
    assert float(rows[5][4]) == pytest.approx(M.diversity(d_gen).value, abs=1e-2)
    assert rows[1][3] == "n/a" and "CLIP-T: no text tower" in text
    assert picture.shape[0] == 1 and picture.shape[-1] == 3


def test_wrong_kind_of_clip_vision_is_refused(likeness_nodes, vision):
    clip, dino = vision
    img = _images(1, 2)
    with pytest.raises(ValueError, match="is a dinov2; Evaluate Likeness needs a CLIP vision model"):
        _run(likeness_nodes["LikenessEvaluate"], references=img, images=img, clip_vision=dino, prompts="",
             word="", class_noun="")
    with pytest.raises(ValueError, match="The dino input needs a DINOv2 model"):
        _run(likeness_nodes["LikenessEvaluate"], references=img, images=img, clip_vision=clip, prompts="",
             word="", class_noun="", dino=clip)
