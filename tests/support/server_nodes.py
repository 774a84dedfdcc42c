"""Test-only custom nodes for the ComfyUI server the workflow tests start (linked into its
``custom_nodes`` by :func:`support.comfy_server.test_server`; never imported by the tests).

* ``LikenessTestCondProbe``: a digest and the shape of a CONDITIONING, shown in /history, so a test
  sees whether a trained word changed what the sampler gets;
* ``LikenessTestLatentDiff``: max |a - b| and max |b| of two LATENTs;
* :mod:`support.tiny_clip_vision` for Load CLIP Vision: ``tiny_clip_vision.safetensors`` is
  written into the server's clip_vision folder at start-up and loads through a shim (ComfyUI's
  detection knows only full-size encoders); every other file loads as before.
"""
import hashlib
import os

import torch

import comfy.clip_vision
import folder_paths
import safetensors.torch

from support import tiny_clip_vision  # the server runs with the tests folder on its path


class LikenessTestCondProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def probe(self, conditioning):
        t = conditioning[0][0].detach().float().cpu().contiguous()
        return {"ui": {"digest": [hashlib.sha256(t.numpy().tobytes()).hexdigest()], "shape": [list(t.shape)]}}


class LikenessTestLatentDiff:
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


# ---- the tiny CLIP vision model for Load CLIP Vision ----------------------------------------------
_FOLDER = folder_paths.get_folder_paths("clip_vision")[0]
_CFG_PATH = os.path.join(_FOLDER, "likeness_tiny_clip_vision.json")  # not a model extension: not listed
_original = comfy.clip_vision.load_clipvision_from_sd


def _tiny_aware(sd, prefix="", convert_keys=False):
    if not convert_keys and tiny_clip_vision.is_tiny(sd):
        clip = comfy.clip_vision.ClipVisionModel(_CFG_PATH)
        clip.load_sd(sd)
        return clip
    return _original(sd, prefix, convert_keys)


def _write_tiny_clip_vision() -> None:
    os.makedirs(_FOLDER, exist_ok=True)
    tiny_clip_vision.write_config(_CFG_PATH)
    out = os.path.join(_FOLDER, tiny_clip_vision.FILE)
    if not os.path.exists(out):
        with torch.inference_mode():
            sd = tiny_clip_vision.random_state_dict(comfy.clip_vision.ClipVisionModel(_CFG_PATH).model)
        safetensors.torch.save_file(sd, out)


comfy.clip_vision.load_clipvision_from_sd = _tiny_aware
_write_tiny_clip_vision()

NODE_CLASS_MAPPINGS = {"LikenessTestCondProbe": LikenessTestCondProbe, "LikenessTestLatentDiff": LikenessTestLatentDiff}
